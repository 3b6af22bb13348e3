"""``moelab scaling ...``: DeepSeek LLM scaling laws and IsoFLOP sweeps (docs/methods.md §10).

    moelab scaling flops configs/deepseek-v2-lite.toml --tokens 5.7e12   # M, 6N1/M, 6N2/M, C = M·D
    moelab scaling flops 24x2048                                        # a Table 3 row (l_seq 4096)
    moelab scaling suggest --budget 1e20                                # η_opt, B_opt, M_opt, D_opt, a shape
    moelab scaling isoflop runs/data/shk512 --budgets 3e10 1e11 3e11 --out runs/isoflop
    moelab scaling fit runs/isoflop                                     # re-fit and re-plot
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moelab.cli_utils import err, friendly
from moelab.errors import ConfigError

scaling_app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="DeepSeek LLM scaling laws: FLOPs/token M, compute C = M·D, optimal LR/batch/model/data for a "
         "budget, and IsoFLOP sweeps that fit M_opt ∝ C^a on your own corpus.",
)

_SHAPE = re.compile(r"^(\d+)[x×](\d+)$")


def _si(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "-"
    for div, suffix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "B"),
                        (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _table(title: str, rows: list[tuple[str, str, str]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    for r in rows:
        t.add_row(*r)
    return t


def _budgets(values: list[str]) -> list[float]:
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            try:
                out.append(float(part))
            except ValueError:
                raise ConfigError(f"--budgets expects numbers of FLOPs such as 1e11 (got {part!r}); give DATA_DIR "
                                  "first: isoflop DATA_DIR --budgets 1e11 3e11 --out DIR") from None
    return out


def _pair(text: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.replace("-", ",").split(","))
    except ValueError:
        raise ConfigError(f"{name} expects MIN,MAX such as 2,6 (got {text!r})") from None
    return lo, hi


@scaling_app.command()
@friendly
def flops(
    target: Annotated[str, typer.Argument(
        help="A TOML config, a checkpoint directory (or its config.json), or a shape LxD such as 24x2048.",
        show_default=False)],
    seq_len: Annotated[int | None, typer.Option(
        help="Context length l_seq in the attention term (default: the config's pre-YaRN context; 4096 for a "
             "shape).")] = None,
    tokens: Annotated[float | None, typer.Option(help="Training tokens D: also print C = M·D.")] = None,
    budget: Annotated[float | None, typer.Option(help="A compute budget C: also print the data D = C/M this "
                                                      "model should see for it.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Vocabulary for 6N2 (shapes only; default 102400).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Non-embedding FLOPs/token M of a config or shape, 6N1/M, 6N2/M, and C = M·D.

    M = 72·L·d² + 12·L·d·l_seq (DeepSeek LLM; attention coefficient 12). For an MoE config also
    M_active = 6·N_active,non-embedding + 12·L·d·l_seq, which counts routed experts at their top-K share
    (the paper's formula only sees L and d). Examples:

        moelab scaling flops 8x512                 # Table 3: M 352M, 6N1/M 0.43, 6N2/M 1.32
        moelab scaling flops configs/tiny.toml --seq-len 256 --budget 1e15
        moelab scaling flops configs/deepseek-v2-lite.toml --tokens 5.7e12 --json
    """
    from moelab.scaling.laws import (
        PAPER_SEQ_LEN,
        PAPER_VOCAB,
        check_budget,
        config_flops,
        read_model_config,
        shape_flops,
    )

    if budget is not None:
        check_budget(budget)
    if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
        raise ConfigError(f"--tokens must be a positive number of tokens such as 2e12 (got {tokens:g})")
    m = _SHAPE.match(target.strip())
    if m and not Path(target).exists():
        s = shape_flops(int(m[1]), int(m[2]), seq_len or PAPER_SEQ_LEN, vocab or PAPER_VOCAB)
        out = {"target": target, **s.as_dict(), "tokens": tokens, "C": s.M * tokens if tokens else None}
        moe = None
    else:
        if vocab is not None:
            raise ConfigError("--vocab applies to shapes like 24x2048; a config has its own vocab_size")
        f = config_flops(read_model_config(target), seq_len=seq_len, tokens=tokens)
        s, moe = f.shape, f
        out = {"target": target, **f.as_dict()}
    if budget is not None:
        out["budget"] = budget
        out["tokens_for_budget"] = budget / s.M
        if moe is not None:
            out["tokens_for_budget_active"] = budget / moe.M_active
    if as_json:
        print(json.dumps(out, indent=2))
        return
    rows = [
        ("shape", f"{s.n_layer} × {s.d}", f"l_seq {s.seq_len}, vocab {s.n_vocab:,}"),
        ("M  72Ld² + 12Ld·l", _si(s.M), f"{s.M:,.0f} non-embedding FLOPs / token"),
        ("6N1 / M", f"{s.ratio_n1:.3f}", f"6N1 = 72Ld² = {_si(s.six_n1)}"),
        ("6N2 / M", f"{s.ratio_n2:.3f}", f"6N2 = 6N1 + 6Vd = {_si(s.six_n2)}"),
    ]
    if moe is not None:
        rows += [
            ("parameters", _si(moe.total_params), f"{_si(moe.activated_params)} activated per token"),
            ("M_active  6N_act + 12Ld·l", _si(moe.M_active),
             f"activated non-embedding {_si(moe.active_non_embedding_params)}"
             + (" (MoE-aware)" if moe.is_moe else "")),
        ]
    if tokens is not None:
        rows.append(("C = M·D", _si(s.M * tokens, " FLOPs"), f"D = {_si(tokens)} tokens"))
        if moe is not None:
            rows.append(("C_active = M_active·D", _si(moe.M_active * tokens, " FLOPs"), ""))
    if budget is not None:
        rows.append(("D = C/M for the budget", _si(budget / s.M, " tokens"), f"C = {budget:.3g}"))
        if moe is not None and moe.is_moe:
            rows.append(("D = C/M_active", _si(budget / moe.M_active, " tokens"), ""))
    Console().print(_table(f"moelab scaling flops — {escape(target)}", rows))


@scaling_app.command()
@friendly
def suggest(
    budget: Annotated[float, typer.Option("--budget", "-C", help="Compute budget C in FLOPs (C = M·D).",
                                          show_default=False)],
    seq_len: Annotated[int, typer.Option(min=1, help="Sequence length, to express B_opt in sequences.")] = 4096,
    vocab: Annotated[int, typer.Option(min=1, help="Vocabulary, for the parameter count of the shape.")] = 102400,
    multiple: Annotated[int, typer.Option(min=2, help="Round the width d to a multiple of this.")] = 64,
    aspect: Annotated[float, typer.Option(min=1e-3, help="Preferred width/depth ratio d/L of the shape.")] = 100.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Peak LR, batch size, model scale and data that DeepSeek LLM's laws give for a budget C.

    For a compute budget C in FLOPs:

        η_opt = 0.3118·C^−0.1250       peak learning rate
        B_opt = 0.2920·C^0.3271        batch size in tokens (÷ --seq-len for sequences)
        M_opt = 0.1715·C^0.5243        model scale, non-embedding FLOPs/token
        D_opt = 5.8316·C^0.4757        training tokens

    plus the nearest shape (L layers × width d) to M_opt and the tokens it should see (C/M). The laws
    were fit between 1e17 and 3e20 FLOPs. Examples:

        moelab scaling suggest --budget 8.456e22          # DeepSeek 7B: η 4.25e-4, 2252 × 4096 tokens
        moelab scaling suggest --budget 1e15 --seq-len 256 --multiple 16 --aspect 32
    """
    from moelab.scaling.shapes import suggest as run_suggest

    s = run_suggest(budget, seq_len, n_vocab=vocab, multiple=multiple, aspect=aspect)
    if as_json:
        print(json.dumps(s.as_dict(), indent=2))
        return
    h, a, sh = s.hyper, s.allocation, s.shape
    rows = [
        ("budget C", f"{budget:.4g}", "FLOPs"),
        ("η_opt", f"{h.lr:.3g}", "0.3118·C^−0.1250 (peak learning rate)"),
        ("B_opt", _si(h.batch_tokens, " tokens"), f"{h.batch_sequences:,.1f} sequences of {seq_len}"),
        ("M_opt", _si(a.M_opt), "0.1715·C^0.5243 non-embedding FLOPs/token"),
        ("D_opt", _si(a.D_opt, " tokens"), "5.8316·C^0.4757"),
        ("nearest shape", f"{sh.n_layer} × {sh.d}",
         f"{sh.n_heads} heads of {sh.head_dim}; M = {_si(sh.M)} ({sh.rel_err:+.1%}), d/L = {sh.aspect:.0f}"),
        ("  its data C/M", _si(s.shape_tokens, " tokens"),
         f"{_si(s.as_dict()['shape_non_embedding_params'])} non-embedding params"),
    ]
    Console().print(_table(f"moelab scaling suggest — C = {budget:.3g}", rows))
    if budget < 1e17:
        err.print(f"note: C = {budget:.3g} is below the 1e17–3e20 range the laws were fit on; treat them as a "
                  "starting point, or measure with `moelab scaling isoflop`")


@scaling_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly
def isoflop(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Argument(help="A token directory from `moelab data prepare`.",
                                             show_default=False)],
    budgets: Annotated[list[str], typer.Option(
        "--budgets", "-b", help="Compute budgets C in FLOPs: --budgets 1e11 3e11 1e12 (or comma-separated).",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep directory (results.json, isoflop.png, runs/).",
                                      show_default=False)],
    sizes: Annotated[int, typer.Option(min=3, help="Model sizes per budget.")] = 5,
    layers: Annotated[str, typer.Option(help="Range of n_layer, MIN,MAX.")] = "2,6",
    widths: Annotated[str, typer.Option(help="Range of the width d, MIN,MAX.")] = "32,192",
    width_multiple: Annotated[int, typer.Option(min=2, help="d is a multiple of this.")] = 16,
    seq_len: Annotated[int, typer.Option(min=2, help="Training sequence length l_seq (also in M).")] = 128,
    aspect: Annotated[float, typer.Option(min=1e-3, help="Preferred d/L among shapes of about the same M.")] = 32.0,
    span: Annotated[float | None, typer.Option(
        help="Sample 10^±SPAN around the paper's M_opt(C) instead of the whole feasible range.")] = None,
    hparams: Annotated[str, typer.Option(
        help="'fixed': --lr and --batch-size for every run; 'laws': η_opt(C) and B_opt(C) per budget.")] = "fixed",
    lr: Annotated[float, typer.Option(help="Peak learning rate with --hparams fixed.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step with --hparams fixed.")] = 16,
    min_steps: Annotated[int, typer.Option(min=1, help="Leave out shapes that would get fewer steps.")] = 20,
    moe: Annotated[bool, typer.Option("--moe", help="Small MoE models (8 routed top-2 + 1 shared) instead of "
                                                    "dense ones, same activated FLOPs.")] = False,
    eval_tokens: Annotated[int, typer.Option(min=2, help="Validation tokens per evaluation (at most).")] = 131072,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the weights and batches.")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's).")] = None,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints",
                                                   help="Keep each finished run's checkpoints/.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planned runs and stop.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
):
    """Train an IsoFLOP sweep on DATA_DIR and fit M_opt = k·C^a (results.json, isoflop.png).

    For each budget C, a few shapes are trained on D = C/M tokens each; a parabola of val bits-per-byte
    vs log10 M per budget gives M_opt(C) at its minimum, then M_opt = k·C^a and D_opt = C/M_opt.
    Writes OUT/results.json (runs + fit), OUT/isoflop.png and OUT/runs/<name>/ (one training run each).
    Running it again skips finished runs and resumes an interrupted one; Ctrl-C stops after a checkpoint.
    Each run costs about C / 2e10 seconds plus ~20 ms per step on one CPU core; pass --threads 1 when
    other jobs share the cores (oversubscribed torch threads can be 10x slower). Examples:

        moelab data prepare shakespeare --out runs/data/shk512 --vocab-size 512
        moelab scaling isoflop runs/data/shk512 --budgets 3e10 1e11 3e11 --out runs/isoflop \\
            --layers 1,4 --widths 16,96 --seq-len 64 --aspect 24 --dry-run
        moelab scaling isoflop runs/data/shk512 --budgets 1e13,3e13,1e14 --out runs/isoflop-big --hparams laws
    """
    from moelab.scaling.isoflop import run_sweep
    from moelab.scaling.isoflop_plan import SweepSettings, plan_sweep

    values = list(budgets) + [a for a in ctx.args]
    bad = [a for a in ctx.args if a.startswith("-")]
    if bad:
        raise ConfigError(f"unknown option {bad[0]}; see `moelab scaling isoflop --help`")
    settings = SweepSettings(
        budgets=_budgets(values), sizes=sizes, layers=_pair(layers, "--layers"), widths=_pair(widths, "--widths"),
        width_multiple=width_multiple, seq_len=seq_len, aspect=aspect, span=span, hparams=hparams, lr=lr,
        batch_size=batch_size, min_steps=min_steps, moe=moe, eval_tokens=eval_tokens, seed=seed, threads=threads)
    if dry_run:
        t = Table(title="planned runs", title_justify="left")
        for col in ("run", "M", "tokens", "steps", "batch", "lr"):
            t.add_column(col, justify="left" if col == "run" else "right")
        plan = plan_sweep(settings)
        for r in plan:
            t.add_row(r.name, _si(r.M), _si(r.tokens), str(r.steps), f"{r.batch_size}×{seq_len}", f"{r.lr:.3g}")
        Console().print(t)
        err.print(f"{len(plan)} runs, {sum(r.C for r in plan):.3g} FLOPs (M·D) in all")
        return
    from moelab.data.tokens import read_meta

    read_meta(data_dir)  # a clear error before anything is created
    res = run_sweep(data_dir, out, settings, progress=not quiet, console=err, keep_checkpoints=keep_checkpoints)
    for n in res.notes:
        err.print(f"[yellow]note:[/] {escape(n)}", highlight=False)
    if not res.complete:
        err.print(f"interrupted: {len(res.rows)} runs recorded in {escape(str(out))}; run the same command again "
                  "to resume")
        raise typer.Exit(130)
    _print_fit(res.fit, out)


def _print_fit(fit: dict, out: Path) -> None:
    t = Table(title=f"IsoFLOP fit — {escape(str(out))}", title_justify="left")
    for col in ("budget C", "sizes", "M_opt", "D_opt", "min bpb", "used"):
        t.add_column(col, justify="right")
    for b in fit["budgets"]:
        t.add_row(f"{b['budget']:.3g}", str(b["n_runs"]), _si(b.get("M_opt")), _si(b.get("D_opt")),
                  f"{b['loss_min']:.4f}" if b.get("loss_min") is not None else "-", "yes" if b.get("used") else "no")
    con = Console()
    con.print(t)
    if fit.get("a") is not None:
        con.print(f"M_opt = {fit['M_opt']['coef']:.4g}·C^{fit['a']:.4f}   D_opt = {fit['D_opt']['coef']:.4g}·"
                  f"C^{fit['b']:.4f}   (R² {fit['M_opt']['r2']:.3f}; DeepSeek LLM: a = 0.5243, b = 0.4757)",
                  highlight=False)
    for n in fit["notes"]:
        err.print(f"[yellow]note:[/] {escape(n)}", highlight=False)
    err.print(f"wrote {escape(str(out / 'results.json'))} and {escape(str(out / 'isoflop.png'))}")


@scaling_app.command()
@friendly
def fit(
    directory: Annotated[Path, typer.Argument(help="The --out directory of `moelab scaling isoflop`.",
                                              show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the fit as JSON.")] = False,
):
    """Fit again from a sweep's results (also a partial one) and redraw isoflop.png.

    Reads DIR/results.json (or, without it, every DIR/runs/*/result.json), fits a parabola of val
    bits-per-byte vs log10 M per budget, and M_opt = k·C^a over the budgets whose minimum lies inside
    their sampled sizes. Example:

        moelab scaling fit runs/isoflop
    """
    from moelab.scaling.isoflop import refit

    res = refit(directory)
    if as_json:
        print(json.dumps(res["fit"], indent=2))
        return
    _print_fit(res["fit"], directory)


__all__ = ["scaling_app"]
