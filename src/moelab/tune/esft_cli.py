"""``moelab esft ...``: Expert-Specialized Fine-Tuning (docs/methods.md §5) from the command line.

    moelab esft score ckpt/ data/task.jsonl --out runs/task/summary.json     # expert relevance on task data
    moelab esft select runs/task/summary.json --p 0.2 --out runs/task/expert_cfg.json
    moelab esft train configs/finetune-arith.toml --experts runs/task/expert_cfg.json --out runs/esft
    moelab esft merge ckpt/ runs/task/esft --out runs/task/merged           # base + trained experts
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moelab.cli_utils import check_out_file, err, friendly, resolve_device

esft_app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Expert-Specialized Fine-Tuning: score experts on task data, select the relevant ones per layer, "
         "train only those, merge them back.",
)


def _batches(data: Path, model_dir: Path, tokenizer: Path | None, samples: int, seq_len: int,
             batch_size: int, seed: int) -> Iterator:
    """int64 token batches [B, T] from a token directory or a JSON Lines SFT file."""
    import torch

    from moelab.errors import DataError

    _check_data(data)
    if data.is_dir():
        from moelab.data.tokens import TokenData

        tokens = TokenData(data, "train")
        for step in range(math.ceil(samples / batch_size)):
            x, _ = tokens.batch(batch_size, seq_len, step=step, seed=seed)
            yield x[:samples - step * batch_size]
        return
    try:
        from moelab.data.sft import pack_file
    except ImportError as e:
        raise DataError(f"reading JSON Lines SFT data needs moelab.data.sft, which this install lacks ({e}); "
                        "use a token directory from `moelab data prepare` instead") from None
    rows: list = []
    for seq in pack_file(data, tokenizer or model_dir, seq_len, n_sequences=samples):
        if rows and len(seq) != len(rows[0]):       # a shorter last sequence goes in its own batch
            yield torch.stack(rows)
            rows = []
        rows.append(torch.as_tensor(seq, dtype=torch.long))
        if len(rows) == batch_size:
            yield torch.stack(rows)
            rows = []
    if rows:
        yield torch.stack(rows)


def _check_data(data: Path) -> None:
    """Fail before the model loads when DATA is neither a token directory nor a JSON Lines file."""
    from moelab.errors import DataError

    if data.is_dir():
        return                                  # TokenData names what a token directory lacks
    if not data.is_file():
        raise DataError(f"data not found: {data}; give a token directory (`moelab data prepare`) or a "
                        ".jsonl SFT file")
    if data.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{data} is neither a token directory nor a .jsonl SFT file; prepare pre-training "
                        "text with `moelab data prepare`, or give JSON Lines with prompt/response records")


def _select_count(row: dict, p: float) -> int:
    from moelab.tune.esft import select_experts

    return len(select_experts({"token_scores": {"0": row}, "gate_scores": {"0": row}}, "token", p)["experts"]["0"])


@esft_app.command()
@friendly
def score(
    model_dir: Annotated[Path, typer.Argument(help="Base checkpoint directory (Hugging Face format).",
                                              show_default=False)],
    data: Annotated[Path, typer.Argument(help="Task data: a token directory from `moelab data prepare` (its "
                                              "train split), or a .jsonl SFT file (packed with the model's "
                                              "tokenizer).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Summary JSON to write (token_scores, gate_scores).")],
    samples: Annotated[int, typer.Option(min=1, help="Sequences to score (N_s; the paper uses 32).")] = 32,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sequence (L; the paper uses 4096).")] = 4096,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 1,
    norm: Annotated[str, typer.Option(help="Score normalisation: per_layer (paper, released summaries) or "
                                           "legacy_across_layers (released script).")] = "per_layer",
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json (or its directory) for .jsonl data; "
                                                        "default: MODEL_DIR.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the windows drawn from a token directory.")] = 0,
    dtype: Annotated[str | None, typer.Option(help="Load the weights as float32/bfloat16/float16 "
                                                   "(default: as stored).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when available).")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or table.")] = False,
):
    """Score every routed expert of MODEL_DIR on DATA (ESFT relevance) and write OUT.

    Token score: the share of the layer's top-k slots an expert gets; gate score: the mean weight the
    layer gives it. Averaged per sequence, then over sequences.
    """
    from moelab.errors import ConfigError
    from moelab.interop.checkpoint import load
    from moelab.tune.esft import SCORE_NORMS, score_experts, write_summary

    if norm not in SCORE_NORMS:
        raise ConfigError(f"unknown --norm {norm!r}; use one of {', '.join(SCORE_NORMS)}")
    check_out_file(out, example="summary.json")
    _check_data(data)
    device = resolve_device(device)
    model = load(model_dir, dtype=dtype, device=device, progress=not quiet)
    if seq_len > model.config.max_position_embeddings:
        warnings.warn(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                      f"({model.config.max_position_embeddings}); scores may not reflect normal use", stacklevel=1)
    batches = list(_batches(data, model_dir, tokenizer, samples, seq_len, batch_size, seed))
    summary = score_experts(model, batches, progress=not quiet, norm=norm)
    write_summary(summary, out)
    if not quiet:
        Console().print(_score_table(summary))
    meta = summary["meta"]
    err.print(f"wrote {escape(str(out))}: {meta['sequences']} sequences, {meta['tokens']:,} tokens, "
              f"{len(summary['token_scores'])} MoE layers", highlight=False)


def _score_table(summary: dict, p: float = 0.2) -> Table:
    token, gate = summary["token_scores"], summary["gate_scores"]
    t = Table(title="ESFT expert scores", title_justify="left", caption_justify="left")
    t.add_column("layer", justify="right", style="bold")
    t.add_column(f"experts for p={p}", justify="right")
    t.add_column("top experts (token score)")
    t.add_column("Σ gate", justify="right")
    counts = []
    for layer in sorted(token, key=int):
        row = token[layer]
        n = _select_count(row, p)
        counts.append(n)
        top = sorted(row.items(), key=lambda kv: (-kv[1], int(kv[0])))[:4]
        t.add_row(layer, str(n), "  ".join(f"{e} ({v:.3f})" for e, v in top),
                  f"{sum(gate.get(layer, {}).values()):.3f}")
    t.caption = f"mean {sum(counts) / len(counts):.2f} experts per layer for token p={p}"
    return t


@esft_app.command()
@friendly
def select(
    summary: Annotated[Path, typer.Argument(help="Summary JSON from `moelab esft score` (or a released ESFT "
                                                 "summary.json).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Expert config to write (expert_cfg.json).")],
    score: Annotated[str, typer.Option(help="token (share of routed tokens) or gate (mean gate weight).")] = "token",
    p: Annotated[float, typer.Option("--p", help="Per layer, add the best experts until their scores sum to "
                                                 "p (0.2 for token; 0.1 for raw gate scores).")] = 0.2,
    train_shared_experts: Annotated[bool, typer.Option("--train-shared-experts",
                                                       help="Also train the shared experts.")] = False,
    train_non_expert_modules: Annotated[bool, typer.Option(
        "--train-non-expert-modules", help="Also train attention, norms, embeddings, head and routers.")] = False,
):
    """Pick the experts to train in each layer from SUMMARY and write OUT (expert_cfg.json)."""
    from moelab.tune.esft import read_summary, select_experts, write_expert_config

    check_out_file(out, example="expert_cfg.json")
    cfg = select_experts(read_summary(summary), score, p, train_shared_experts, train_non_expert_modules)
    write_expert_config(cfg, out)
    t = Table(title=f"ESFT experts ({escape(score)} score, p={p})", title_justify="left", caption_justify="left")
    t.add_column("layer", justify="right", style="bold")
    t.add_column("n", justify="right")
    t.add_column("experts (selection order)")
    counts = []
    for layer in sorted(cfg["experts"], key=int):
        ids = cfg["experts"][layer]
        counts.append(len(ids))
        t.add_row(layer, str(len(ids)), ", ".join(map(str, ids)))
    t.caption = (f"mean {sum(counts) / max(len(counts), 1):.2f} experts per layer; shared experts "
                 f"{'train' if train_shared_experts else 'frozen'}; non-expert modules "
                 f"{'train' if train_non_expert_modules else 'frozen'}")
    Console().print(t)
    err.print(f"wrote {escape(str(out))}", highlight=False)


@esft_app.command()
@friendly
def train(
    config: Annotated[Path, typer.Argument(help="Fine-tuning TOML ([finetune] base, [data] path, [train]).")],
    expert_config: Annotated[Path, typer.Option("--experts", help="expert_cfg.json from `moelab esft select`.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a setting (repeatable).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Checkpoint to start from.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
):
    """Train only the selected experts (same as `moelab finetune esft` with esft.expert_config).

        moelab esft train configs/finetune-arith.toml --experts runs/task/expert_cfg.json --out runs/esft
    """
    from moelab.tune.cli import run_method

    sets = [*(overrides or []), f"esft.expert_config={expert_config}"]
    run_method("esft", config, out, sets, base, resume, progress)


@esft_app.command()
@friendly
def merge(
    base_dir: Annotated[Path, typer.Argument(help="Base checkpoint the experts were trained from.",
                                             show_default=False)],
    esft_dir: Annotated[Path, typer.Argument(help="ESFT directory (expert_cfg.json + model.safetensors).",
                                             show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged checkpoint directory to write.")],
    dtype: Annotated[str | None, typer.Option(help="Write as float32/bfloat16/float16 (default: the base's).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it holds a moelab checkpoint.")] = False,
):
    """Write BASE_DIR with the trained experts of ESFT_DIR in place: a full checkpoint at OUT.

    OUT must be a new or empty directory, or (with --overwrite) a checkpoint moelab wrote.
    """
    from moelab.tune.esft import merge_esft

    path = merge_esft(base_dir, esft_dir, out, dtype=dtype, progress=True, overwrite=overwrite)
    err.print(f"wrote {escape(str(path))}", highlight=False)
