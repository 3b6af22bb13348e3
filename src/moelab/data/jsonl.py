"""Reading JSON Lines files of records (preference pairs, GRPO prompts, HumanEval samples) with one
convention for bad input: a missing file, a line that is not JSON or not an object, or a record its parser
refuses is a :class:`~moelab.errors.DataError` ``file:line: reason`` — or, with ``skip_malformed``, skipped
and recorded in ``skipped``; blank lines are ignored.

    pairs = read_records(path, parse_pair, what="preference file (JSON Lines with prompt/chosen/rejected)",
                         skip_malformed=False, skipped=stats.skipped, hint="data.skip_malformed")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from moelab.errors import DataError

T = TypeVar("T")


def read_records(path: str | os.PathLike, parse: Callable[[dict, str], T], *, what: str,
                 skip_malformed: bool = False, skipped: list[str] | None = None, hint: str | None = None) -> list[T]:
    """``[parse(row, "file:line"), ...]`` for every JSON object line of ``path`` (module docstring).

    ``what`` names the file in the message when it is missing; ``hint`` is the setting that skips bad lines
    (named in the message; without one the message only says to fix the line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such {what}")
    out: list[T] = []
    with p.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError("expected a JSON object (one per line)")
                out.append(parse(row, where))
            except DataError as e:
                if not skip_malformed:
                    fix = f"fix the line (or skip such lines with {hint})" if hint else "fix or remove the line"
                    raise DataError(f"{where}: {e}; {fix}") from None
                if skipped is not None:
                    skipped.append(f"{where}: {e}")
    return out


__all__ = ["read_records"]
