"""UMP-style evaluation: do models notice that a math problem is unreasonable? (docs/methods.md §9)

    items = generate_ump(40, seed=0)                         # flawed problems, each with its original
    report = run_ump(model, tokenizer, items, modes=("plain", "ccc"))
    report["modes"]["ccc"]["metrics"]                        # {"acc": ..., "abs": ..., "rel": ...}
    write_report(report, items, "runs/ump")                  # results.json, responses.jsonl, table.md

**A substitute for the paper's setup, built here.** The UMP data is not public: the problems come from
:mod:`moelab.evaluate.ump_data` (rule-based flaws in the five UMP categories, on reasoning-gym's
``gsm_symbolic``); flags are decided by the rule-based judge of :mod:`moelab.evaluate.ump_judge` (the
paper used an LLM judge); the CCC prompt is a reconstruction.

**Metrics** (exactly as docs/methods.md §9; item i pairs original o_i with flawed f_i):
``Acc = |solved| / n`` with solved = {i : the answer to o_i is numerically right (its final number,
:func:`moelab.evaluate.harness.extract_number`)}; ``Abs = |flagged| / n`` with flagged = {i : the answer
to f_i flags the problem as unreasonable}; ``Rel = |solved ∧ flagged| / |solved|`` (None when nothing is
solved). Reports also give the share of *originals* flagged (false alarms) and Abs per category.

**Prompts.** ``plain``: the problem text alone, as the user message. ``ccc``: the Critical Calculation
and Conclusion template. Its verbatim wording is unpublished; :data:`CCC_TEMPLATE` is the reconstruction
``ccc-reconstructed-v1`` of docs/methods.md §9 (check the premises; solve while testing each intermediate
quantity for plausibility; answer or declare the problem unreasonable). Every result records the
template id; another template can be given (a text file with ``{question}``). Answers are greedy.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from moelab.errors import DataError, MoelabError
from moelab.evaluate.ump_data import (
    CATEGORIES,
    PAPER_SHARES,
    UMPItem,
    atomic_write,
    generate_ump,
    make_flawed,
    read_items,
    strip_suffix,
    write_items,
)

MODES = ("plain", "ccc")

CCC_TEMPLATE_ID = "ccc-reconstructed-v1"
#: A reconstruction (the paper's wording is not public); see the module docstring.
CCC_TEMPLATE = (
    "Solve the following math problem with Critical Calculation and Conclusion.\n"
    "1. Check the premises: are the conditions consistent with each other and possible in the real world?\n"
    "2. Solve step by step. Test every intermediate quantity for plausibility: negative or fractional "
    "counts, parts larger than their totals, impossible units or times.\n"
    "3. Conclude. If the problem is reasonable, give the final answer as a number. If it is not, state "
    "that the problem is unreasonable and explain why.\n"
    "\n"
    "Problem: {question}"
)
PLAIN_TEMPLATE_ID = "plain-v1"
PLAIN_TEMPLATE = "{question}"


# -- prompts and metrics ----------------------------------------------------------------------------

def load_template(mode: str, ccc_template: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(template id, template)`` of a prompt mode; ``ccc_template`` (a file) replaces the built-in CCC
    reconstruction, with id ``file:<name>:<sha256[:12]>``."""
    if mode == "plain":
        return PLAIN_TEMPLATE_ID, PLAIN_TEMPLATE
    if mode != "ccc":
        raise MoelabError(f"unknown prompt mode {mode!r}; use plain, ccc or both")
    if ccc_template is None:
        return CCC_TEMPLATE_ID, CCC_TEMPLATE
    p = Path(ccc_template)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the CCC template {p}: {e}") from None
    if "{question}" not in text:
        raise DataError(f"the CCC template {p} has no {{question}} placeholder; add one where the problem goes")
    return f"file:{p.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}", text


def render_prompt(template: str, question: str) -> str:
    """The user message: the template with ``{question}`` replaced (no other placeholder is expanded)."""
    return template.replace("{question}", question)


def ump_metrics(solved: Sequence[bool], flagged: Sequence[bool]) -> dict:
    """Acc, Abs and Rel of docs/methods.md §9 from per-item booleans (item i: ``solved[i]`` = the original was
    answered correctly, ``flagged[i]`` = the flawed twin was flagged). ``rel`` is None when nothing is
    solved."""
    if len(solved) != len(flagged):
        raise MoelabError(f"solved and flagged differ in length ({len(solved)} vs {len(flagged)})")
    if not solved:
        raise DataError("no items to score")
    n = len(solved)
    n_solved = sum(bool(s) for s in solved)
    both = sum(bool(s) and bool(f) for s, f in zip(solved, flagged, strict=True))
    return {"n": n, "acc": n_solved / n, "abs": sum(bool(f) for f in flagged) / n,
            "rel": both / n_solved if n_solved else None, "solved": n_solved, "flagged": sum(map(bool, flagged)),
            "solved_and_flagged": both}


# -- running ----------------------------------------------------------------------------------------

def run_ump(model, tokenizer, items: Sequence[UMPItem], modes: Sequence[str] = MODES, max_new_tokens: int = 200,
            batch_size: int = 8, ccc_template: str | os.PathLike | None = None,
            judge: Callable[[str, str], bool] | None = None, progress: bool = False) -> dict:
    """Answer every original and flawed problem greedily in each mode, judge and score them.

    ``judge(answer, prompt)`` decides flags (default: :func:`moelab.evaluate.ump_judge.flags_unreasonable`).
    Returns ``{"modes": {mode: {"template_id", "metrics", "per_category", "original_flag_rate",
    "seconds"}}, "responses": [...], ...}``; one response record per item and mode.
    """
    from moelab.evaluate.harness import extract_number, numbers_equal, progress_bar
    from moelab.evaluate.lm import generate_texts
    from moelab.evaluate.ump_judge import JUDGE_ID, flags_unreasonable

    judge = judge or flags_unreasonable
    if not items:
        raise DataError("no UMP items to evaluate")
    modes = list(dict.fromkeys(modes))
    templates = {m: load_template(m, ccc_template) for m in modes}
    out: dict = {"n": len(items), "judge": JUDGE_ID if judge is flags_unreasonable else getattr(judge, "__name__", "custom"),
                 "max_new_tokens": max_new_tokens, "modes": {}, "responses": []}
    with progress_bar(progress, "UMP") as bar:
        task = bar.add_task("ump", total=2 * len(items) * len(modes))
        for mode in modes:
            tid, template = templates[mode]
            prompts = [render_prompt(template, it.original) for it in items] + \
                      [render_prompt(template, it.flawed) for it in items]
            t0 = time.perf_counter()
            answers = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size,
                                     on_batch=lambda k: bar.advance(task, k))
            seconds = time.perf_counter() - t0
            orig, flawed = answers[:len(items)], answers[len(items):]
            solved = [numbers_equal(extract_number(a), float(it.answer)) for a, it in zip(orig, items, strict=True)]
            flagged = [judge(a, p) for a, p in zip(flawed, prompts[len(items):], strict=True)]
            orig_flagged = [judge(a, p) for a, p in zip(orig, prompts[:len(items)], strict=True)]
            per_cat = {}
            for c in dict.fromkeys(it.category for it in items):
                idx = [i for i, it in enumerate(items) if it.category == c]
                per_cat[c] = ump_metrics([solved[i] for i in idx], [flagged[i] for i in idx])
            out["modes"][mode] = {"template_id": tid, "metrics": ump_metrics(solved, flagged),
                                  "per_category": per_cat,
                                  "original_flag_rate": sum(orig_flagged) / len(items), "seconds": seconds}
            for i, it in enumerate(items):
                out["responses"].append({"id": it.id, "mode": mode, "category": it.category,
                                         "original_answer": orig[i], "solved": solved[i],
                                         "original_flagged": orig_flagged[i], "flawed_answer": flawed[i],
                                         "flagged": flagged[i]})
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def results_table(report: dict) -> str:
    """A Markdown table of a :func:`run_ump` report: one row per mode, then Abs per category."""
    lines = ["| mode | template | n | Acc % | Abs % | Rel % | originals flagged % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode, r in report["modes"].items():
        m = r["metrics"]
        lines.append(f"| {mode} | {r['template_id']} | {m['n']} | {_pct(m['acc'])} | {_pct(m['abs'])} | "
                     f"{_pct(m['rel'])} | {_pct(r['original_flag_rate'])} |")
    cats = [c for c in CATEGORIES if any(c in r["per_category"] for r in report["modes"].values())]
    if cats:
        lines += ["", "| Abs % by category | " + " | ".join(f"{c} (n={_cat_n(report, c)})" for c in cats) + " |",
                  "|---|" + "---:|" * len(cats)]
        for mode, r in report["modes"].items():
            lines.append(f"| {mode} | " + " | ".join(_pct(r["per_category"][c]["abs"]) if c in r["per_category"]
                                                     else "n/a" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def _cat_n(report: dict, c: str) -> int:
    for r in report["modes"].values():
        if c in r["per_category"]:
            return r["per_category"][c]["n"]
    return 0


def write_report(report: dict, items: Sequence[UMPItem], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json`` (everything but the responses), ``responses.jsonl``, ``items.jsonl`` and
    ``table.md`` into ``out_dir``, each atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory; give a directory for --out")
    summary = {k: v for k, v in report.items() if k != "responses"}
    return {
        "results": atomic_write(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n"),
        "responses": atomic_write(out / "responses.jsonl", "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in report["responses"])),
        "items": write_items(items, out / "items.jsonl"),
        "table": atomic_write(out / "table.md", results_table(report)),
    }


__all__ = ["CATEGORIES", "CCC_TEMPLATE", "CCC_TEMPLATE_ID", "MODES", "PAPER_SHARES", "UMPItem", "generate_ump",
           "load_template", "make_flawed", "read_items", "render_prompt", "results_table", "run_ump", "strip_suffix",
           "ump_metrics", "write_items", "write_report"]
