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
and Conclusion template (:mod:`moelab.evaluate.ump_prompts`). Its verbatim wording is unpublished;
:data:`CCC_TEMPLATE` is the reconstruction ``ccc-reconstructed-v1`` of docs/methods.md §9 (check the
premises; solve while testing each intermediate quantity for plausibility; answer or declare the problem
unreasonable). Every result records the template id; another template can be given (a text file with
``{question}``). Answers are greedy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from moelab.common.atomic import write_text
from moelab.common.jsonio import write_json
from moelab.common.progress import Bars
from moelab.errors import DataError, MoelabError
from moelab.evaluate.ump_data import (
    CATEGORIES,
    PAPER_SHARES,
    UMPItem,
    generate_ump,
    make_flawed,
    read_items,
    strip_suffix,
    write_items,
)
from moelab.evaluate.ump_judge import JUDGE_ID, flags_unreasonable
from moelab.evaluate.ump_prompts import (
    CCC_TEMPLATE,
    CCC_TEMPLATE_ID,
    MODES,
    PLAIN_TEMPLATE,
    PLAIN_TEMPLATE_ID,
    load_template,
    render_prompt,
)

# -- metrics ----------------------------------------------------------------------------------------

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
    from moelab.evaluate.harness import extract_number, numbers_equal
    from moelab.evaluate.lm import generate_texts

    judge = judge or flags_unreasonable
    if not items:
        raise DataError("no UMP items to evaluate")
    modes = list(dict.fromkeys(modes))
    templates = {m: load_template(m, ccc_template) for m in modes}
    out: dict = {"n": len(items),
                 "judge": JUDGE_ID if judge is flags_unreasonable else getattr(judge, "__name__", "custom"),
                 "max_new_tokens": max_new_tokens, "modes": {}, "responses": []}
    with Bars(progress) as bar:
        task = bar.add_task("UMP", total=2 * len(items) * len(modes))
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
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": write_json(out / "results.json", summary, ensure_ascii=False),
             "responses": out / "responses.jsonl", "items": out / "items.jsonl", "table": out / "table.md"}
    write_text(paths["responses"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report["responses"]))
    write_items(items, paths["items"])
    write_text(paths["table"], results_table(report))
    return paths


__all__ = ["CATEGORIES", "CCC_TEMPLATE", "CCC_TEMPLATE_ID", "MODES", "PAPER_SHARES", "PLAIN_TEMPLATE",
           "PLAIN_TEMPLATE_ID", "UMPItem", "generate_ump", "load_template", "make_flawed", "read_items",
           "render_prompt", "results_table", "run_ump", "strip_suffix", "ump_metrics", "write_items", "write_report"]
