"""JSON results, written one way: indented, atomically, and with one policy for non-finite numbers.

Policy: NaN and ±inf become ``null``. Standard JSON has no NaN, so a file with one would not open in
``jq``, a browser or most other languages' parsers; ``null`` says "no value" wherever the file is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moelab.common.atomic import write_text


def finite(obj):
    """A JSON-safe copy of ``obj``: NaN / ±inf floats become None (recursively through dicts and lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``obj`` as indented JSON text (non-finite numbers as null), ending in a newline."""
    return json.dumps(finite(obj), indent=2, allow_nan=False, **kwargs) + "\n"


def write_json(path: str | os.PathLike, obj, **kwargs) -> Path:
    """Write ``obj`` to ``path`` as indented JSON (non-finite numbers as null), atomically; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, dumps(obj, **kwargs))
    return path


def read_json(path: str | os.PathLike, error: type[Exception], *, missing: str, hint: str = "",
              want_object: bool = True):
    """The JSON value in ``path``, or ``error`` with one clear line.

    ``missing`` is the whole message for a path that is not a file; ``hint`` (what to do) follows the
    message for a file that is not JSON (or, with ``want_object``, not a JSON object).
    """
    p = Path(path)
    if not p.is_file():
        raise error(missing)
    tail = f"; {hint}" if hint else ""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{p} is not valid JSON ({e}){tail}") from None
    if want_object and not isinstance(data, dict):
        raise error(f"{p} must hold a JSON object, not {type(data).__name__}{tail}")
    return data
