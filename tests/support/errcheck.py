"""Helpers of the error tests: a moelab error's message checked for a leaked traceback, TOML writing."""

from __future__ import annotations

import json
from pathlib import Path

from moelab.errors import MoelabError


def clean_message(exc: BaseException) -> str:
    """The message of a moelab error, checking it carries no chained ("during handling...") trace."""
    assert isinstance(exc, MoelabError)
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__, "error leaks a chained traceback"
    msg = str(exc)
    assert msg.strip()
    return msg


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def write_toml(path: Path, model: dict, extra_sections: dict | None = None) -> Path:
    """Write ``{"model": model, **extra_sections}`` as TOML (scalars + one level of sub-tables)."""
    lines = []
    for section, values in {"model": model, **(extra_sections or {})}.items():
        lines.append(f"[{section}]")
        subs = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
        for name, sub in subs.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
