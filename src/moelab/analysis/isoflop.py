"""IsoFLOP sweeps: find the compute-optimal model scale on a local corpus (DeepSeek LLM §3.2).

For each compute budget C the sweep trains a handful of model shapes (L layers of width d), each on
``D = C/M`` tokens, where ``M = 72·L·d² + 12·L·d·l_seq`` (:mod:`moelab.analysis.scaling`), and records
the final validation bits per byte. Then:

* **per budget** a parabola ``loss = c2·x² + c1·x + c0`` in ``x = log10 M``; its vertex
  ``x* = −c1/(2·c2)`` gives ``M_opt(C) = 10^x*`` and ``D_opt(C) = C / M_opt(C)``. A budget counts only
  when the parabola is convex and its vertex lies inside the sampled M range;
* **across budgets** a least-squares line in log-log space: ``M_opt = k·C^a`` and ``D_opt = C/M_opt =
  (1/k)·C^b`` with ``b = 1 − a`` (exactly, since D_opt is derived from M_opt). DeepSeek LLM found
  a = 0.5243 (Chinchilla 0.49, OpenAI 0.73).

**Models.** Dense by default: MHA with ``default_heads(d)``, a SwiGLU FFN of width ``8d/3`` (rounded to
a multiple of 8), so the non-embedding parameters are ``≈ 12·L·d²`` as the formula assumes. With
``moe=True``: 8 routed experts (top-2, sigmoid, loss-free balancing) + 1 shared expert, each of width
``8d/9``, so the *activated* FFN matches the dense one and M is unchanged. M (the paper's formula) sets
D for both; the measured ``M_active`` (:func:`~moelab.analysis.scaling.config_flops`) is recorded too.

**Shapes per budget.** The candidate grid is every L in ``layers`` and d in ``widths`` (multiples of
``width_multiple``). Shapes with fewer than ``min_steps`` optimizer steps at that budget are dropped.
``sizes`` target Ms are log-spaced over the remaining range (or over ``10^±span`` around the paper's
``M_opt(C)``, when ``span`` is set), each mapped to the unused grid shape minimising
``|ln(M/target)| + 0.5·|ln((d/L)/aspect)|``: at tiny scale the loss depends on the shape as well as on M
(8 wide and 4 deep is much worse than 32 wide and 1 deep), so the sweep keeps to one shape family.

**Hyper-parameters** (``hparams``): ``"fixed"`` (the default) uses ``lr`` and ``batch_size`` for every
run — the DeepSeek laws were fit between 1e17 and 2e19 FLOPs and tiny budgets lie many decades below;
``"laws"`` uses ``η_opt(C)`` and ``B_opt(C)/seq_len`` sequences per budget. Both use DeepSeek LLM's
multi-step schedule (×0.316 at 80% and 90%) with ``warmup_fraction`` of the steps as warm-up, AdamW
(0.9, 0.95), weight decay 0.1, clip 1.0.

**Evaluation.** The final validation loss over the whole val split (at most ``eval_tokens`` tokens,
consecutive windows: the same tokens for every run), converted to bits per byte.

**Files** in OUT (each written atomically: temp file + rename)::

    results.json             format, data, settings, one row per run, the fit
    isoflop.png              IsoFLOP curves (loss vs M per budget, fitted parabolas, minima) and
                             M_opt, D_opt vs C with the fitted power laws (paper's law dashed)
    runs/<name>/             one training run (moelab.train.loop.train): metrics.jsonl, model/, report/
    runs/<name>/run.json     what the run is (config, budget, M, D), written before it starts
    runs/<name>/result.json  its outcome, written when it ends; a run with one is never retrained

Running the same sweep again skips finished runs and resumes an interrupted one from its checkpoint;
a run directory whose ``run.json`` disagrees with the current settings is an error, not overwritten.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from moelab.analysis.scaling import (
    D_OPT,
    M_OPT,
    PowerLaw,
    check_budget,
    default_heads,
    non_embedding_flops,
    pick_shape,
)
from moelab.errors import ConfigError, DataError, MoelabError

FORMAT = "moelab-isoflop-v1"


# --- settings and plan ---------------------------------------------------------------------------

@dataclass
class SweepSettings:
    """How the sweep is run (see the module docstring)."""

    budgets: list[float]
    sizes: int = 5
    layers: tuple[int, int] = (2, 6)
    widths: tuple[int, int] = (32, 192)
    width_multiple: int = 16
    seq_len: int = 128
    aspect: float = 32.0
    span: float | None = None
    hparams: Literal["fixed", "laws"] = "fixed"
    lr: float = 3e-3
    batch_size: int = 16
    warmup_fraction: float = 0.05
    min_steps: int = 20
    moe: bool = False
    eval_tokens: int = 131072
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = None

    def __post_init__(self):
        self.budgets = sorted({check_budget(c) for c in self.budgets})
        self.layers, self.widths = tuple(self.layers), tuple(self.widths)
        p = []
        if not self.budgets:
            p.append("give at least one budget, e.g. --budgets 1e11,3e11,1e12")
        if self.sizes < 3:
            p.append(f"--sizes must be at least 3 to fit a parabola (got {self.sizes})")
        if len(self.layers) != 2 or not 1 <= self.layers[0] <= self.layers[1]:
            p.append(f"--layers must be MIN,MAX with 1 <= MIN <= MAX (got {self.layers})")
        if self.width_multiple <= 0 or self.width_multiple % 2:
            p.append(f"--width-multiple must be a positive even number (got {self.width_multiple})")
        elif len(self.widths) != 2 or not 0 < self.widths[0] <= self.widths[1] \
                or self.widths[1] // self.width_multiple * self.width_multiple < max(self.widths[0], 2):
            p.append(f"--widths must be MIN,MAX with 0 < MIN <= MAX and a multiple of {self.width_multiple} "
                     f"between them (got {self.widths})")
        if self.seq_len < 2:
            p.append(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.hparams not in ("fixed", "laws"):
            p.append(f"--hparams must be 'fixed' or 'laws' (got {self.hparams!r})")
        if not self.lr > 0 or self.batch_size < 1 or self.min_steps < 1 or self.eval_tokens < self.seq_len:
            p.append("--lr must be positive, --batch-size and --min-steps at least 1, --eval-tokens at least "
                     "--seq-len")
        if not 0 <= self.warmup_fraction < 1:
            p.append(f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction})")
        if self.span is not None and not self.span > 0:
            p.append(f"--span must be positive (got {self.span})")
        if self.aspect <= 0:
            p.append(f"--aspect must be positive (got {self.aspect})")
        if p:
            raise ConfigError("; ".join(p))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PlannedRun:
    """One training run of the sweep. ``tokens = steps·batch_size·seq_len`` ≈ C/M."""

    name: str
    budget: float
    n_layer: int
    d: int
    n_heads: int
    ffn: int                  # dense SwiGLU width, or the width of each expert with moe
    M: float
    batch_size: int
    lr: float
    steps: int
    warmup_steps: int
    tokens: int

    @property
    def C(self) -> float:
        """The compute actually spent, M·tokens (≈ the budget, up to rounding the steps)."""
        return self.M * self.tokens


def budget_name(c: float) -> str:
    """``1e11`` for 1e11, ``3e11``, ``1.5e12``: short, file-name safe."""
    text = f"{c:.3g}"
    if "e" not in text:
        return text
    mant, exp = text.split("e")
    return f"{mant}e{int(exp)}"


def ffn_width(d: int, moe: bool) -> int:
    """SwiGLU width giving ``3·d·w·(active FFNs) ≈ 8·d²``: 8d/3 dense, 8d/9 per expert (top-2 + 1 shared)."""
    w = 8 * d / (9 if moe else 3)
    return max(8, int(round(w / 8)) * 8)


def sweep_model_config(n_layer: int, d: int, vocab_size: int, seq_len: int, moe: bool = False):
    """The :class:`~moelab.config.ModelConfig` of one sweep shape (see the module docstring)."""
    from moelab.config import make_config

    heads, _ = default_heads(d)
    m = dict(vocab_size=vocab_size, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
             use_mla=False, max_position_embeddings=seq_len, initializer_range=0.02, tie_word_embeddings=False,
             intermediate_size=ffn_width(d, False))
    if moe:
        m.update(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=ffn_width(d, True),
                 first_k_dense_replace=0, scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                 norm_topk_prob=True)
    else:
        m.update(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None)
    return make_config(m, where="the sweep model")


def _batch_and_lr(s: SweepSettings, budget: float) -> tuple[int, float]:
    if s.hparams == "laws":
        from moelab.analysis.scaling import optimal_hyperparams

        h = optimal_hyperparams(budget, s.seq_len)
        return h.batch_sequences_rounded, h.lr
    return s.batch_size, s.lr


def grid(s: SweepSettings) -> list[tuple[int, int, float]]:
    """Every candidate ``(L, d, M)`` of the settings' ranges, by increasing M."""
    lo = max(s.width_multiple, -(-s.widths[0] // s.width_multiple) * s.width_multiple)
    ds = range(lo, s.widths[1] + 1, s.width_multiple)
    return sorted(((L, d, non_embedding_flops(L, d, s.seq_len)) for L in range(s.layers[0], s.layers[1] + 1)
                   for d in ds), key=lambda c: (c[2], c[0]))


def plan_sweep(s: SweepSettings) -> list[PlannedRun]:
    """The runs of a sweep, by budget then M. Raises ConfigError when a budget leaves < 3 shapes."""
    cands = grid(s)
    runs: list[PlannedRun] = []
    for c in s.budgets:
        B, lr = _batch_and_lr(s, c)
        per_step = B * s.seq_len
        feasible = [x for x in cands if round(c / x[2] / per_step) >= s.min_steps]
        if len({x[2] for x in feasible}) < 3:
            smallest = cands[0][2]
            need = s.min_steps * per_step * (cands[2][2] if len(cands) > 2 else smallest)
            raise ConfigError(
                f"budget {c:.3g} is too small: fewer than 3 shapes get {s.min_steps} steps of {B}×{s.seq_len} "
                f"tokens (the smallest shapes need about {need:.2g} FLOPs); raise the budget, lower --min-steps "
                "or --batch-size, or allow smaller --widths/--layers")
        lo, hi = feasible[0][2], feasible[-1][2]
        if s.span is not None:  # a window of 10^±span around the paper's M_opt, slid into [lo, hi]
            centre = min(max(M_OPT(c), lo), hi)
            wlo, whi = centre / 10 ** s.span, centre * 10 ** s.span
            if wlo < lo:
                wlo, whi = lo, min(hi, lo * 10 ** (2 * s.span))
            if whi > hi:
                wlo, whi = max(lo, hi / 10 ** (2 * s.span)), hi
            lo, hi = wlo, whi
        pool = list(feasible)
        chosen = []
        for target in np.geomspace(lo, hi, s.sizes):
            if not pool:
                break
            pick = pick_shape(float(target), pool, aspect=s.aspect, aspect_weight=0.5)
            pool = [x for x in pool if x[2] != pick[2]]  # one shape per distinct M
            chosen.append(pick)
        for L, d, M in sorted(chosen, key=lambda x: x[2]):
            steps = max(1, round(c / M / per_step))
            runs.append(PlannedRun(
                name=f"C{budget_name(c)}-L{L}-d{d}", budget=c, n_layer=L, d=d, n_heads=default_heads(d)[0],
                ffn=ffn_width(d, s.moe), M=M, batch_size=B, lr=lr, steps=steps,
                warmup_steps=min(steps - 1, max(1, round(s.warmup_fraction * steps))) if steps > 1 else 0,
                tokens=steps * per_step))
    return runs


def run_config(run: PlannedRun, s: SweepSettings, data_dir: Path, vocab_size: int, n_val_tokens: int):
    """The :class:`~moelab.train.config.RunConfig` of a planned run."""
    from moelab.train.config import RunConfig

    windows = max(1, min((n_val_tokens - 1) // s.seq_len, s.eval_tokens // s.seq_len))
    train = dict(steps=run.steps, batch_size=run.batch_size, lr=run.lr, lr_schedule="multistep",
                 warmup_steps=run.warmup_steps, dtype=s.dtype, seed=s.seed, threads=s.threads,
                 log_every=max(1, run.steps // 20), eval_every=run.steps, eval_batches=-(-windows // run.batch_size),
                 ckpt_every=max(1, -(-run.steps // 4)), keep_last=1)
    balance = {"method": "loss_free"} if s.moe else {"method": "none"}
    model = sweep_model_config(run.n_layer, run.d, vocab_size, s.seq_len, s.moe)
    return RunConfig(model=model, data={"path": str(data_dir), "seq_len": s.seq_len}, train=train, balance=balance)


# --- fits ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parabola:
    """``loss = c2·x² + c1·x + c0`` with ``x = log10 M``."""

    c2: float
    c1: float
    c0: float
    x_range: tuple[float, float]

    def __call__(self, x):
        return self.c2 * np.asarray(x) ** 2 + self.c1 * np.asarray(x) + self.c0

    @property
    def convex(self) -> bool:
        return self.c2 > 0

    @property
    def x_min(self) -> float:
        """The vertex ``−c1 / (2·c2)`` (nan when the parabola opens downward or is flat)."""
        return -self.c1 / (2 * self.c2) if self.convex else math.nan

    @property
    def interior(self) -> bool:
        """A convex parabola whose minimum lies within the sampled range of x."""
        return self.convex and self.x_range[0] <= self.x_min <= self.x_range[1]


def fit_parabola(M, loss) -> Parabola:
    """Least-squares parabola of ``loss`` vs ``log10 M`` (needs three distinct M)."""
    x, y = np.log10(np.asarray(M, dtype=float)), np.asarray(loss, dtype=float)
    if len(np.unique(x)) < 3 or not np.isfinite(y).all() or not np.isfinite(x).all():
        raise DataError(f"a parabola needs at least 3 distinct model sizes with finite losses (got {len(x)})")
    c2, c1, c0 = np.polyfit(x, y, 2)
    return Parabola(float(c2), float(c1), float(c0), (float(x.min()), float(x.max())))


def fit_power_law(C, Y) -> tuple[PowerLaw, float]:
    """``Y = k·C^a`` by least squares on ``log Y = log k + a·log C``; returns the law and R² (in log space)."""
    lc, ly = np.log(np.asarray(C, dtype=float)), np.log(np.asarray(Y, dtype=float))
    if len(np.unique(lc)) < 2 or not (np.isfinite(lc).all() and np.isfinite(ly).all()):
        raise DataError(f"a power law needs at least 2 distinct budgets with positive values (got {len(lc)})")
    a, logk = np.polyfit(lc, ly, 1)
    resid = ly - (a * lc + logk)
    ss = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss if ss > 0 else 1.0
    return PowerLaw(float(math.exp(logk)), float(a)), r2


def fit_isoflop(rows: list[dict]) -> dict:
    """Per-budget parabolas and the M_opt/D_opt power laws from result rows (``budget``, ``M``,
    ``val_bpb``, ``status``). Failed runs and budgets with fewer than 3 sizes are left out, with notes."""
    ok = [r for r in rows if r.get("status") == "finished" and r.get("val_bpb") is not None
          and math.isfinite(r["val_bpb"])]
    notes: list[str] = []
    budgets = []
    for c in sorted({r["budget"] for r in ok}):
        rs = sorted((r for r in ok if r["budget"] == c), key=lambda r: r["M"])
        entry: dict = {"budget": c, "n_runs": len(rs), "M": [r["M"] for r in rs], "val_bpb": [r["val_bpb"] for r in rs]}
        try:
            p = fit_parabola(entry["M"], entry["val_bpb"])
        except DataError:
            notes.append(f"budget {c:.3g}: only {len(rs)} finished sizes, need 3 for a parabola")
            budgets.append({**entry, "parabola": None, "used": False})
            continue
        entry["parabola"] = {"c2": p.c2, "c1": p.c1, "c0": p.c0, "x": "log10 M"}
        entry["convex"], entry["interior"] = p.convex, p.interior
        if p.convex:
            M_opt = 10 ** p.x_min
            entry.update(M_opt=M_opt, D_opt=c / M_opt, loss_min=float(p(p.x_min)))
        if not p.interior:
            why = "the parabola opens downward" if not p.convex else (
                f"its minimum (M = {10 ** p.x_min:.3g}) lies outside the sampled sizes "
                f"{10 ** p.x_range[0]:.3g}–{10 ** p.x_range[1]:.3g}")
            notes.append(f"budget {c:.3g} left out of the power law: {why}; widen --widths/--layers or use --span")
        entry["used"] = p.interior
        budgets.append(entry)
    used = [b for b in budgets if b["used"]]
    fit: dict = {"budgets": budgets, "n_used": len(used), "notes": notes,
                 "paper": {"M_opt": M_OPT.as_dict(), "D_opt": D_OPT.as_dict()}}
    if len(used) >= 2:
        law, r2 = fit_power_law([b["budget"] for b in used], [b["M_opt"] for b in used])
        fit.update(M_opt={**law.as_dict(), "r2": r2}, D_opt={"coef": 1 / law.coef, "exponent": 1 - law.exponent, "r2": r2},
                   a=law.exponent, b=1 - law.exponent)
    else:
        fit.update(M_opt=None, D_opt=None, a=None, b=None)
        notes.append(f"{len(used)} budget(s) with an interior minimum; the power law needs at least 2")
    return fit


# --- files ---------------------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; delete it to redo that part of the sweep") from None


def plot_isoflop(rows: list[dict], fit: dict, path: Path) -> Path:
    """IsoFLOP curves (left) and the M_opt / D_opt power laws (right), written atomically as PNG."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    budgets = fit["budgets"]
    colors = [f"C{i % 10}" for i in range(len(budgets))]
    for b, col in zip(budgets, colors, strict=True):
        ax.plot(b["M"], b["val_bpb"], "o", color=col, label=f"C = {b['budget']:.3g}")
        if b.get("parabola"):
            p = b["parabola"]
            x = np.linspace(math.log10(min(b["M"])) - 0.1, math.log10(max(b["M"])) + 0.1, 100)
            ax.plot(10 ** x, p["c2"] * x ** 2 + p["c1"] * x + p["c0"], "-", color=col, alpha=0.7)
            if b.get("M_opt") and b.get("interior"):
                ax.plot(b["M_opt"], b["loss_min"], "*", color=col, markersize=14, markeredgecolor="k")
    failed = [r for r in rows if r.get("status") != "finished"]
    if failed:
        ax.plot([], [], "x", color="grey", label=f"{len(failed)} failed run(s), not shown")
    ax.set_xscale("log")
    ax.set_xlabel("M (non-embedding FLOPs / token)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("IsoFLOP curves (★ = parabola minimum)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    used = [b for b in budgets if b.get("used")]
    if used:
        cs = np.array([b["budget"] for b in used])
        ax2.plot(cs, [b["M_opt"] for b in used], "o", color="C0", label="M_opt (FLOPs/token)")
        ax2.plot(cs, [b["D_opt"] for b in used], "s", color="C1", label="D_opt (tokens)")
        span = np.geomspace(cs.min() / 2, cs.max() * 2, 50)
        if fit.get("M_opt"):
            km, a = fit["M_opt"]["coef"], fit["M_opt"]["exponent"]
            kd, b_ = fit["D_opt"]["coef"], fit["D_opt"]["exponent"]
            ax2.plot(span, km * span ** a, "-", color="C0", label=f"fit M_opt = {km:.3g}·C^{a:.3f}")
            ax2.plot(span, kd * span ** b_, "-", color="C1", label=f"fit D_opt = {kd:.3g}·C^{b_:.3f}")
        ax2.plot(span, M_OPT(span), "--", color="C0", alpha=0.5, label="DeepSeek LLM M_opt = 0.1715·C^0.5243")
        ax2.plot(span, D_OPT(span), "--", color="C1", alpha=0.5,
                 label="DeepSeek LLM D_opt = 5.8316·C^0.4757")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.xaxis.set_minor_formatter(NullFormatter())
        ax2.legend(fontsize=7, loc="best")
    else:
        ax2.text(0.5, 0.5, "no budget with an interior minimum yet", ha="center", va="center",
                 transform=ax2.transAxes)
    ax2.set_xlabel("compute C = M·D (FLOPs)")
    ax2.set_title("compute-optimal allocation")
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
    return path


def collect_rows(out_dir: Path) -> list[dict]:
    """The ``result.json`` rows of every run under ``OUT/runs`` (finished or failed), by budget and M."""
    rows = [_read_json(p) for p in sorted((Path(out_dir) / "runs").glob("*/result.json"))]
    rows = [r for r in rows if isinstance(r, dict) and "budget" in r and "M" in r]
    return sorted(rows, key=lambda r: (r["budget"], r["M"]))


def load_results(out_dir: str | os.PathLike) -> dict:
    """``OUT/results.json`` (the runs of the last sweep into OUT); without one, the rows of every
    ``OUT/runs/*/result.json`` (e.g. after results.json was deleted)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise DataError(f"{out} is not a directory; give the --out directory of `moelab scaling isoflop`")
    if (out / "results.json").is_file():
        res = _read_json(out / "results.json")
        if not isinstance(res, dict) or res.get("format") != FORMAT:
            got = res.get("format") if isinstance(res, dict) else None
            raise DataError(f"{out / 'results.json'} has format {got!r}, not {FORMAT!r}")
    else:
        res = {"format": FORMAT, "runs": collect_rows(out)}
    if not res.get("runs"):
        raise DataError(f"{out} holds no IsoFLOP results (no results.json, no runs/*/result.json); run "
                        f"`moelab scaling isoflop DATA_DIR --out {out}` first")
    return res


def refit(out_dir: str | os.PathLike) -> dict:
    """Fit and plot again from OUT's results; rewrites ``results.json`` and ``isoflop.png``."""
    out = Path(out_dir)
    res = load_results(out)
    res["fit"] = fit_isoflop(res["runs"])
    write_json(out / "results.json", res)
    plot_isoflop(res["runs"], res["fit"], out / "isoflop.png")
    return res


# --- the sweep -----------------------------------------------------------------------------------

@dataclass
class SweepResult:
    out_dir: Path
    rows: list[dict]
    fit: dict
    complete: bool              # False when interrupted (Ctrl-C); run again to resume
    trained: int = 0            # runs trained (or resumed) in this call
    cached: int = 0             # runs skipped because they had finished before
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)   # about the runs (data repeated); the fit has its own


def _fingerprint(meta: dict) -> dict:
    sp = meta.get("splits", {})
    return {"vocab_size": meta.get("vocab_size"), "train_tokens": sp.get("train", {}).get("tokens"),
            "val_tokens": sp.get("val", {}).get("tokens"), "val_bytes": sp.get("val", {}).get("bytes")}


def _spec(run: PlannedRun, cfg, fingerprint: dict) -> dict:
    rc = json.loads(cfg.model_dump_json())
    rc["data"].pop("path", None)   # the corpus is identified by its fingerprint, so it may move
    rc["train"].pop("threads", None)  # does not change the result
    return {"run": asdict(run), "run_config": rc, "data": fingerprint}


def run_sweep(data_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: SweepSettings, *,
              progress: bool = True, console=None, keep_checkpoints: bool = False,
              train_fn: Callable | None = None) -> SweepResult:
    """Train every planned run not finished yet, then fit and plot. See the module docstring.

    ``progress`` shows a line per run (on ``console``, default stderr) and the training bar.
    ``keep_checkpoints=False`` deletes a finished run's ``checkpoints/`` (its ``model/`` stays).
    ``train_fn`` replaces :func:`moelab.train.loop.train` (tests).
    """
    import shutil

    from moelab.data.tokens import read_meta
    from moelab.train.state import latest_checkpoint

    if train_fn is None:
        from moelab.train.loop import train as train_fn
    data_dir, out = Path(data_dir), Path(out_dir)
    meta = read_meta(data_dir)  # DataError when missing or not a token directory
    fp = _fingerprint(meta)
    vocab = int(meta["vocab_size"])
    n_val = int(fp["val_tokens"] or 0)
    if n_val < settings.seq_len + 1:
        raise DataError(f"the val split of {data_dir} has {n_val} tokens, fewer than --seq-len + 1 = "
                        f"{settings.seq_len + 1}; prepare it with more validation data or lower --seq-len")
    if console is None:
        from rich.console import Console
        console = Console(stderr=True)

    def say(msg: str) -> None:
        if progress:
            console.print(msg, highlight=False)

    plan = plan_sweep(settings)
    n_train = int(fp["train_tokens"] or 0)
    out.mkdir(parents=True, exist_ok=True)
    total_c = sum(r.C for r in plan)
    say(f"IsoFLOP sweep: {len(plan)} runs over {len(settings.budgets)} budgets, {total_c:.3g} FLOPs in all "
        f"(M·D), into {out}")
    rows: list[dict] = []
    trained = cached = 0
    complete = True
    notes: list[str] = []

    def save() -> dict:
        fit = fit_isoflop(rows)
        write_json(out / "results.json", {
            "format": FORMAT, "data": str(data_dir), "data_fingerprint": fp, "settings": settings.as_dict(),
            "m_definition": "M = 72·L·d² + 12·L·d·l_seq (DeepSeek LLM); D = C/M", "complete": complete,
            "runs": rows, "fit": fit})
        return fit

    with warnings.catch_warnings():
        # dense MHA sweep models export as model_type 'deepseek'; the warning about hub code is noise here
        warnings.filterwarnings("ignore", message=".*model_type 'deepseek'.*")
        for i, run in enumerate(plan, 1):
            run_dir = out / "runs" / run.name
            cfg = run_config(run, settings, data_dir, vocab, n_val)
            spec = _spec(run, cfg, fp)
            head = (f"[{i}/{len(plan)}] C={run.budget:.3g} L={run.n_layer} d={run.d} M={run.M:.3g} "
                    f"D={run.tokens:.3g} ({run.steps} steps × {run.batch_size}×{settings.seq_len}, lr {run.lr:.3g})")
            if (run_dir / "run.json").is_file():
                old = _read_json(run_dir / "run.json")
                if old != json.loads(json.dumps(spec)):
                    raise ConfigError(
                        f"{run_dir} was started with different settings or data than this sweep; use another "
                        f"--out, or delete {run_dir} to retrain it")
            if (run_dir / "result.json").is_file():
                rows.append(_read_json(run_dir / "result.json"))
                cached += 1
                bpb = rows[-1].get("val_bpb")
                say(f"{head}: done before, " + (f"val_bpb {bpb:.4f}" if bpb is not None else "failed"))
                continue
            if run.tokens > n_train:
                notes.append(f"{run.name} sees its training data {run.tokens / n_train:.1f} times")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "run.json", spec)
            resume = latest_checkpoint(run_dir) is not None
            say(head + (" — resuming" if resume else ""))
            t0 = time.perf_counter()
            row = {"name": run.name, "run_dir": f"runs/{run.name}", **asdict(run), "C": run.C,
                   "moe": settings.moe, "seq_len": settings.seq_len}
            row.update(_param_counts(cfg.model, settings.seq_len))
            try:
                res = train_fn(cfg, run_dir, resume=resume, progress=progress)
            except KeyboardInterrupt:
                complete = False
                break
            except MoelabError as e:   # a diverged run: recorded, left out of the fit
                row.update(status="failed", error=str(e), val_bpb=None, seconds=time.perf_counter() - t0)
                write_json(run_dir / "result.json", row)
                rows.append(row)
                trained += 1
                say(f"    failed: {e}")
                continue
            if res.status != "finished":
                complete = False
                say(f"    interrupted at step {res.step}; run the same command again to resume")
                break
            ev = res.last_eval
            row.update(status="finished", val_bpb=float(ev["val_bpb"]), val_loss=float(ev["val_loss"]),
                       val_tokens=int(ev.get("val_tokens", 0)), seconds=time.perf_counter() - t0)
            write_json(run_dir / "result.json", row)
            if not keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            rows.append(row)
            trained += 1
            say(f"    val_bpb {row['val_bpb']:.4f} ({row['seconds']:.1f} s)")
            save()
    # rows of runs finished earlier but no longer in the plan (e.g. fewer --budgets) stay out of this fit
    fit = save()
    plot = plot_isoflop(rows, fit, out / "isoflop.png") if rows else None
    if fit.get("a") is not None:
        say(f"fit: M_opt = {fit['M_opt']['coef']:.4g}·C^{fit['a']:.4f}, D_opt = {fit['D_opt']['coef']:.4g}·"
            f"C^{fit['b']:.4f} over {fit['n_used']} budgets (DeepSeek LLM: a = 0.5243, b = 0.4757)")
    return SweepResult(out, rows, fit, complete, trained, cached, plot, notes)


def _param_counts(model_cfg, seq_len: int) -> dict:
    from moelab.analysis.scaling import config_flops

    f = config_flops(model_cfg, seq_len=seq_len)
    return {"M_active": f.M_active, "total_params": f.total_params, "activated_params": f.activated_params,
            "embedding_params": f.embedding_params}


__all__ = [
    "FORMAT", "Parabola", "PlannedRun", "SweepResult", "SweepSettings", "budget_name", "collect_rows",
    "ffn_width", "fit_isoflop", "fit_parabola", "fit_power_law", "grid", "load_results", "plan_sweep",
    "plot_isoflop", "refit", "run_config", "run_sweep", "sweep_model_config", "write_atomic", "write_json",
]
