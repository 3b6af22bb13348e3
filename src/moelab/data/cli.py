"""``moelab data ...``: turn text into token directories for pre-training.

    moelab data prepare shakespeare --out data/shk                 # the demo corpus, 8k BPE
    moelab data prepare "src/**/*.py" docs/ --out data/code --vocab-size 16384
    moelab data prepare chats.jsonl --text-field content --out data/chats --tokenizer data/shk
    moelab data info data/shk
    moelab data code stdlib --out runs/code/stdlib.jsonl           # a code corpus, filtered and deduplicated
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from moelab.cli_utils import err, friendly

data_app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Prepare pre-training data: train a byte-level BPE tokenizer and write token files.",
)


@data_app.command()
@friendly
def prepare(
    sources: Annotated[list[str], typer.Argument(
        help="'shakespeare' (demo corpus), a directory, a quoted glob ('src/**/*.py'), a .txt/.jsonl/"
             ".parquet file, or a datasets save_to_disk directory. Several are read in order.",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Token directory to write.")],
    tokenizer: Annotated[Path | None, typer.Option(
        help="Use this tokenizer.json (or a directory holding one) instead of training one.")] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size of the trained tokenizer.")] = 8192,
    min_frequency: Annotated[int, typer.Option(min=1, help="Merge only pairs seen this often.")] = 2,
    val_fraction: Annotated[float, typer.Option(help="Fraction of documents held out for validation.")] = 0.05,
    val_docs: Annotated[int | None, typer.Option(min=0, help="Hold out exactly this many documents "
                                                            "(instead of --val-fraction).")] = None,
    text_field: Annotated[str, typer.Option(help="JSONL field / Parquet column with the text.")] = "text",
    strict: Annotated[bool, typer.Option("--strict", help="Fail on a file that is not UTF-8 "
                                                         "instead of skipping it.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed JSONL lines "
                                                             "instead of failing.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the train/val split.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing token directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or table.")] = False,
    max_chunk_bytes: Annotated[int, typer.Option(
        min=1024, help="Encode at most this many bytes of text at once; the tokenizer needs ~250 bytes of memory "
        "per byte (the default, 1 MiB: ~0.3 GB). Longer documents are encoded in pieces cut before a space that "
        "starts a word, which leaves their tokens unchanged; only where no such space is near (a single word "
        "longer than 1/16 of this) is a piece cut mid-word, which can change the one or two tokens at that "
        "cut.")] = 1 << 20,
    fim_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fill-in-the-middle: rearrange this fraction of the train documents PSM-style, "
        "<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle (DeepSeek-Coder-V2 Lite: 0.5). Two uniform "
        "character cuts per document; the val split stays left-to-right.")] = 0.0,
    fim_seed: Annotated[int, typer.Option(min=0, help="Seed of the FIM draws and cuts.")] = 0,
):
    """Read SOURCE..., train a tokenizer on the train documents, and write OUT (tokens + tokenizer).

    Documents are split into train/val whole; each is written as its tokens followed by EOS. Nothing
    is left at OUT unless the run completes.

        moelab data prepare runs/code/stdlib.jsonl --out runs/data/code --fim-rate 0.5   # code with FIM
    """
    from moelab.data.fim import FimSettings
    from moelab.data.tokens import prepare as run_prepare

    run_prepare(sources, out, tokenizer, vocab_size=vocab_size, min_frequency=min_frequency,
                val_fraction=val_fraction, val_docs=val_docs, seed=seed, text_field=text_field,
                strict=strict, skip_bad=skip_bad, overwrite=overwrite, progress=not quiet, console=err,
                max_chunk_bytes=max_chunk_bytes,
                fim=FimSettings(fim_rate=fim_rate, seed=fim_seed) if fim_rate > 0 else None)


@data_app.command()
@friendly
def code(
    trees: Annotated[list[str], typer.Argument(
        help="Source trees (directories), or 'stdlib' for this machine's Python standard library without its "
             "test suites.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON Lines file to write ({text, path, language}).")],
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="A directory name to skip anywhere in the trees (repeatable).")] = None,
    max_file_bytes: Annotated[int, typer.Option(min=1, help="Skip files larger than this.")] = 1 << 20,
    near_threshold: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="Drop a file whose estimated Jaccard similarity (MinHash over word 5-grams) "
        "with a kept one reaches this.")] = 0.85,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
):
    """Build a code corpus from source trees: DeepSeek-Coder-V2's filters, exact and near-duplicate removal,
    the language from each file's extension; prints what was kept and dropped, and why.

    Dropped and counted: files too large, binary (NUL bytes), not UTF-8, of an unknown extension, empty,
    failing the quality filters (mean line length <= 100, longest line <= 1000, >= 25% alphabetic, HTML
    >= 20% visible text, JSON/YAML of 50-5000 characters), exact or near duplicates of a kept file.

        moelab data code stdlib --out runs/code/stdlib.jsonl
        moelab data prepare runs/code/stdlib.jsonl --out runs/data/code --vocab-size 4096 --fim-rate 0.5
    """
    from moelab.data.code import build_code_corpus

    report = build_code_corpus(trees, out, exclude=tuple(exclude or ()), max_file_bytes=max_file_bytes,
                               near_threshold=near_threshold, progress=not quiet)
    summary = out.with_name(out.name + ".summary.json")
    from moelab.common.atomic import write_text

    write_text(summary, json.dumps(report.to_dict(), indent=2) + "\n")
    if not quiet:
        Console(stderr=True).print(report.table(f"wrote {escape(str(out))}"))
    err.print(f"kept {report.n_kept:,} files, dropped {sum(report.dropped.values()):,}; summary: "
              f"{escape(str(summary))}")


@data_app.command()
@friendly
def prefs(
    checkpoint: Annotated[Path, typer.Argument(help="A moelab checkpoint (with its tokenizer) to sample from.")],
    task_file: Annotated[Path, typer.Option("--tasks", help="Prompt/completion JSON Lines with reference answers "
                                                           "(`moelab data tasks`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Preference JSON Lines to write.")],
    samples: Annotated[int, typer.Option(min=2, help="Answers sampled per prompt.")] = 8,
    temperature: Annotated[float, typer.Option(min=0.01, help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.01, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer budget.")] = 16,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, ... (auto: cuda when available).")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
):
    """On-policy preference pairs for DPO from the model's own samples: per prompt, a correct answer
    (exact match with the reference) is chosen and an incorrect one rejected.

        moelab data prefs runs/ft-full/model --tasks runs/tasks/arith-train.jsonl --out runs/prefs.jsonl
    """
    from moelab.cli_utils import resolve_device
    from moelab.common.progress import Bars
    from moelab.data.sft import read_jsonl
    from moelab.data.tasks import check_jsonl_out, write_jsonl
    from moelab.data.tokenizer import load_tokenizer
    from moelab.errors import DataError
    from moelab.interop.checkpoint import load
    from moelab.tune.preferences import build_preferences

    check_jsonl_out(out, overwrite)
    rows = [{"messages": msgs} for _, msgs in read_jsonl(task_file, skip_hint=None)][:limit]
    model = load(checkpoint, device=resolve_device(device))
    tok = load_tokenizer(checkpoint)
    with Bars(enabled=not quiet) as bars:
        task = bars.add_task("sampling", total=len(rows))
        pairs, st = build_preferences(model, tok, rows, samples, temperature, top_p, max_new_tokens, seed=seed,
                                      on_batch=lambda k: bars.advance(task, k))
    summary = (f"{st.prompts:,} prompts, {st.correct_samples:,} of {st.samples:,} samples correct; "
               f"{st.all_correct:,} prompts always right and {st.all_wrong:,} always wrong give no pair")
    if not pairs:
        raise DataError(f"no preference pairs: {summary}. Sample more answers (--samples) or at another "
                        "--temperature, or use a model that solves some of the prompts")
    write_jsonl(pairs, out)
    err.print(f"wrote {len(pairs):,} pairs to {escape(str(out))} ({summary})")


@data_app.command()
@friendly
def info(
    directory: Annotated[Path, typer.Argument(help="A token directory written by `moelab data prepare`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print meta.json as it is.")] = False,
):
    """Show documents, bytes, tokens and bytes/token per split of a token directory."""
    from moelab.data.tokens import read_meta, summary_table

    meta = read_meta(directory)
    if as_json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
        return
    out = Console()
    out.print(summary_table(meta, title=f"moelab data — {escape(str(directory))}"))
    for s in meta.get("sources", []):
        out.print(f"  source {escape(s['source'])} ({s['kind']}): {s['documents']:,} documents, "
                  f"{s['bytes']:,} bytes", highlight=False)


@data_app.command()
@friendly
def tasks(
    task: Annotated[str, typer.Argument(help="A preset (arithmetic, arithmetic-hard, gsm) or a reasoning-gym "
                                             "dataset name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON Lines file to write.")],
    size: Annotated[int, typer.Option(min=1, help="Number of examples.")] = 1000,
    seed: Annotated[int, typer.Option(min=0, help="Generator seed (different seeds give disjoint draws).")] = 0,
    exclude: Annotated[Path | None, typer.Option(
        help="A JSONL task file whose prompts must not appear (e.g. the training file, for a test set).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
):
    """Generate a prompt/completion task file offline with reasoning-gym (for `moelab finetune`).

        moelab data tasks arithmetic --size 4000 --seed 0 --out runs/tasks/arith-train.jsonl
        moelab data tasks arithmetic --size 300 --seed 1 --exclude runs/tasks/arith-train.jsonl \
            --out runs/tasks/arith-test.jsonl
    """
    from moelab.data.sft import read_jsonl
    from moelab.data.tasks import check_jsonl_out, generate, write_jsonl

    check_jsonl_out(out, overwrite)   # before the (slow) generation
    seen = set()
    if exclude is not None:
        seen = {m[0]["content"] for _, msgs in read_jsonl(exclude, skip_hint=None) for m in [msgs]
                if m[0]["role"] == "user"}
    rows = generate(task, size, seed, exclude=seen)
    write_jsonl(rows, out)
    err.print(f"wrote {len(rows):,} examples to {escape(str(out))}, e.g. "
              f"{escape(rows[0]['prompt'])!r} → {escape(rows[0]['completion'])!r}")
