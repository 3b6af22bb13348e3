"""Task data generated offline with the PyPI package ``reasoning-gym``: prompt/completion JSON Lines.

    moelab data tasks arithmetic --size 4000 --seed 0 --out runs/tasks/arith-train.jsonl

Presets (``TASKS``): ``arithmetic`` (two-term sums and differences of 1–2 digit integers: small enough
that a 2M-parameter model can learn it), ``arithmetic-hard`` (2–4 terms, 1–3 digits, + − ×, parentheses),
``gsm`` (``gsm_symbolic`` grade-school word problems). Each line is
``{"prompt": question, "completion": answer, "task": name}``; answers are exact-match scored by
:func:`exact_match` (whitespace-trimmed string equality; a trailing period is ignored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moelab.common.atomic import write_file
from moelab.errors import DataError

TASKS: dict[str, tuple[str, dict]] = {
    "arithmetic": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                                        "operators": ("+", "-"), "allow_parentheses": False,
                                        "allow_negation": False, "format_style": "simple",
                                        "whitespace": "single"}),
    "arithmetic-hard": ("basic_arithmetic", {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3,
                                             "operators": ("+", "-", "*"), "format_style": "simple",
                                             "whitespace": "single"}),
    "gsm": ("gsm_symbolic", {}),
}


#: reasoning-gym seeds item i with ``seed + i``, so datasets with seeds 0 and 1 share all but one item;
#: moelab spreads user seeds this far apart, making different seeds give disjoint draws.
SEED_STRIDE = 10_000_000


def generate(task: str, size: int, seed: int = 0, exclude: set[str] | None = None) -> list[dict]:
    """``size`` examples of a preset (or any reasoning-gym dataset name) as prompt/completion dicts.

    ``exclude``: prompts to leave out (e.g. the training prompts, for a disjoint test set); more items
    are drawn until ``size`` new ones are found (an error if the task cannot provide them).
    """
    if size < 1:
        raise DataError(f"size must be at least 1 (got {size})")
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("task generation needs the reasoning-gym package: pip install 'moelab[tasks]'") from None
    if seed < 0:
        raise DataError(f"seed must be >= 0 (got {seed})")
    name, kwargs = TASKS.get(task, (task, {}))
    exclude = exclude or set()
    draw = size if not exclude else 4 * size
    rows: list[dict] = []
    for attempt in range(4):
        try:
            ds = reasoning_gym.create_dataset(name, size=draw, seed=seed * SEED_STRIDE + attempt * draw, **kwargs)
        except Exception as e:  # reasoning-gym raises a plain error for unknown names
            raise DataError(f"unknown task {task!r} ({e}); presets: {', '.join(TASKS)}, or a reasoning-gym "
                            "dataset name such as basic_arithmetic") from None
        for x in ds:
            if x["question"] not in exclude:
                rows.append({"prompt": x["question"], "completion": str(x["answer"]), "task": task})
                if len(rows) == size:
                    return rows
    raise DataError(f"could only draw {len(rows)} of {size} {task} examples not in the excluded set; ask for "
                    "fewer or use a harder preset")


def normalize(answer: str) -> str:
    a = answer.strip()
    return a[:-1].rstrip() if a.endswith(".") else a


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after trimming whitespace and one trailing period."""
    return normalize(prediction) == normalize(answer)


def check_jsonl_out(path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Refuse (a :class:`DataError`) an output path that is a directory or lies under a file, or an existing
    file unless ``overwrite``."""
    out = Path(path)
    if not overwrite and out.is_file():
        raise DataError(f"--out {out} exists; pass --overwrite to replace it, or choose another path")
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give the JSON Lines file to write, e.g. "
                        f"--out {out / 'tasks.jsonl'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"--out {out}: {parent} is a file, not a directory; choose another path")
            break
    return out


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON Lines atomically (temp file, then rename)."""
    out = check_jsonl_out(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


__all__ = ["TASKS", "check_jsonl_out", "exact_match", "generate", "normalize", "write_jsonl"]
