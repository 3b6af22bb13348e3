"""``moelab eval infill``: single-line infilling exact match (:mod:`moelab.evaluate.infill`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from moelab.cli_utils import check_out_file, err, friendly, resolve_device
from moelab.common.progress import Bars


@friendly
def infill(
    model: Annotated[str, typer.Argument(help="A checkpoint trained with FIM (its tokenizer must have the FIM "
                                              "sentinels).", show_default=False)],
    source: Annotated[str, typer.Option(
        help="'humaneval' (every non-blank line of the 164 canonical solutions, masked in turn) or a JSON Lines "
             "code corpus of held-out files (`moelab data code`).")] = "humaneval",
    per_file: Annotated[int, typer.Option(min=1, help="Lines per file of a code corpus (seeded).")] = 4,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many tasks.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per task.")] = 48,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 8,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the line choice in a code corpus.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the result (and 20 examples) here "
                                                                 "as JSON.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ... (auto: cuda when available).")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Single-line infilling exact match: remove one line, show the code before and after it in the PSM
    format, compare the model's first line with the removed one (trailing whitespace ignored).

        moelab eval infill runs/code-fim/model                       # HumanEval, 1,033 lines
        moelab eval infill runs/code-fim/model --source runs/code/heldout.jsonl --per-file 4
    """
    from moelab.evaluate.infill import file_line_tasks, humaneval_line_tasks, run_infill
    from moelab.evaluate.load_cli import load_model

    if out is not None:
        check_out_file(out, example="infill.json")
    if source == "humaneval":
        from moelab.evaluate.humaneval import load_problems

        tasks = humaneval_line_tasks(load_problems(), limit)
    else:
        tasks = file_line_tasks(source, per_file, seed, limit)
    m, tok = load_model(model, resolve_device(device))
    t0 = time.perf_counter()
    with Bars(enabled=not quiet) as bars:
        task = bars.add_task("infilling", total=len(tasks))
        result = run_infill(m, tok, tasks, max_new_tokens, batch_size, on_batch=lambda k: bars.advance(task, k))
    result.update(model=model, source=source, seconds=round(time.perf_counter() - t0, 1))
    if out is not None:
        from moelab.common.atomic import write_text

        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"exact match {result['exact_match']:.4f} ({result['hits']} of {result['n']} lines)")
    if out is not None:
        err.print(f"wrote {escape(str(out))}", highlight=False)


__all__ = ["infill"]
