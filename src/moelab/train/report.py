"""End-of-run report, rebuilt from the files a run leaves behind (so it can be regenerated any time).

Inputs in ``RUN_DIR``:

``metrics.jsonl``            one JSON object per line. Training lines carry ``step, tokens, loss, lr,
                             tokens_per_s, maxvio_batch``; evaluation lines carry ``step, val_loss,
                             val_ppl, val_bpb, maxvio_global``. Extra keys are ignored; a line with
                             ``val_loss`` is an evaluation line, one with ``loss`` a training line. A
                             truncated last line (a run killed mid-write) is skipped.
``expert_load.npy``          optional float array ``[n_moe_layers, n_experts]``: each layer's share of
                             routed tokens per expert on the validation set (rows sum to 1).
``expert_load_layers.json``  optional list of the layer indices of those rows.

Outputs in ``RUN_DIR/report/`` (each file replaced atomically; ``summary.md`` last):
``loss.png``, ``maxvio.png``, ``expert_load.png`` (only with ``expert_load.npy``), ``summary.md``.

Curves are smoothed with a trailing moving average over ``SMOOTH_STEPS`` optimizer steps, the
100-step smoothing of the Loss-Free Balancing paper's MaxVio_batch plots (docs/methods.md §3).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from moelab.common.atomic import write_text
from moelab.common.figures import save_figure
from moelab.errors import ConfigError, MoelabError

SMOOTH_STEPS = 100
TRAIN_KEYS = ("step", "tokens", "loss", "lr", "tokens_per_s", "maxvio_batch")
EVAL_KEYS = ("step", "val_loss", "val_ppl", "val_bpb", "maxvio_global")


class ReportError(MoelabError):
    """The files of a run cannot be turned into a report (missing, unreadable or inconsistent)."""


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average: ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``.

    NaNs are left out of each window's mean (a window of only NaNs gives NaN); the first
    ``window - 1`` outputs average over the values seen so far. ``values``: 1-D, ``[N] -> [N]``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ConfigError(f"smooth() takes a 1-D sequence, got shape {x.shape}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ConfigError(f"smoothing window must be an integer >= 1, got {window!r}")
    ok = np.isfinite(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, x.size + 1)
    lo = np.maximum(0, hi - int(window))
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


@dataclass
class Metrics:
    """Columns of a run's metrics: ``train[key]`` and ``evals[key]`` are float arrays (NaN = absent)."""

    train: dict[str, np.ndarray] = field(default_factory=dict)
    evals: dict[str, np.ndarray] = field(default_factory=dict)
    skipped_last_line: bool = False

    @property
    def n_train(self) -> int:
        return len(self.train.get("step", ()))

    @property
    def n_evals(self) -> int:
        return len(self.evals.get("step", ()))


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def read_metrics(path: Path) -> Metrics:
    """Parse ``metrics.jsonl`` into train / eval columns sorted by step (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(
            f"no metrics file at {path}; a report needs the metrics.jsonl a training run writes "
            "into its run directory"
        )
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e}") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    train_rows, eval_rows, skipped = [], [], False
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(numbered) - 1:  # a run killed mid-write leaves a partial last line
                skipped = True
                continue
            raise ReportError(f"{path}:{lineno} is not a JSON object ({e}); fix or delete that line") from None
        if "val_loss" in row:
            eval_rows.append(row)
        elif "loss" in row:
            train_rows.append(row)
    if not train_rows and not eval_rows:
        raise ReportError(f"{path} holds no training lines (with 'loss') and no evaluation lines (with 'val_loss')")

    def columns(rows: list[dict], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        cols = {k: np.array([_number(r.get(k)) for r in rows], dtype=np.float64) for k in keys}
        order = np.argsort(cols["step"], kind="stable")
        return {k: v[order] for k, v in cols.items()}

    return Metrics(columns(train_rows, TRAIN_KEYS), columns(eval_rows, EVAL_KEYS), skipped)


def read_expert_load(run_dir: Path) -> tuple[np.ndarray, list[int]] | None:
    """``(load [L, E], layer indices [L])`` from ``expert_load.npy`` (+ ``..._layers.json``), or None."""
    npy = Path(run_dir) / "expert_load.npy"
    if not npy.is_file():
        return None
    try:
        load = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as e:   # numpy's text suggests allow_pickle: moelab never unpickles
        raise ReportError(f"cannot read {npy}: not a plain numeric .npy array ({type(e).__name__}); delete it "
                          "(training writes it anew at its next evaluation)") from None
    if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 2:
        raise ReportError(f"{npy} must be a [n_moe_layers, n_experts] array, got shape {load.shape}")
    load = load.astype(np.float64)
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise ReportError(f"{npy} holds negative or non-finite shares")
    sums = load.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ReportError(f"{npy} has a layer with no routed tokens (a row summing to 0)")
    load = load / sums  # tolerate rows saved as counts or with rounding drift
    layers = list(range(load.shape[0]))
    js = Path(run_dir) / "expert_load_layers.json"
    if js.is_file():
        try:
            layers = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ReportError(f"cannot read {js}: {e}") from None
        if not isinstance(layers, list) or len(layers) != load.shape[0] or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
            raise ReportError(f"{js} must list {load.shape[0]} integer layer indices, one per row of {npy.name}")
    return load, layers


def _window_rows(steps: np.ndarray, n_steps: int = SMOOTH_STEPS) -> int:
    """How many logged rows span ``n_steps`` optimizer steps (rows may be logged every k steps)."""
    diffs = np.diff(steps[np.isfinite(steps)])
    interval = float(np.median(diffs[diffs > 0])) if np.any(diffs > 0) else 1.0
    return max(1, int(round(n_steps / interval)))


def _si(x: float) -> str:
    """1234567 -> '1.23M'."""
    if not math.isfinite(x):
        return "n/a"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _tokens_axis(ax, steps: np.ndarray, tokens: np.ndarray) -> None:
    """A top x-axis in tokens, when tokens grow strictly with the step (piecewise-linear map)."""
    ok = np.isfinite(steps) & np.isfinite(tokens)
    s, t = steps[ok], tokens[ok]
    if s.size < 2 or np.any(np.diff(s) <= 0) or np.any(np.diff(t) <= 0):
        return
    slope_lo, slope_hi = (t[1] - t[0]) / (s[1] - s[0]), (t[-1] - t[-2]) / (s[-1] - s[-2])

    def fwd(x):
        x = np.asarray(x, dtype=np.float64)
        y = np.interp(x, s, t)
        y = np.where(x < s[0], t[0] + (x - s[0]) * slope_lo, y)
        return np.where(x > s[-1], t[-1] + (x - s[-1]) * slope_hi, y)

    def inv(y):
        y = np.asarray(y, dtype=np.float64)
        x = np.interp(y, t, s)
        x = np.where(y < t[0], s[0] + (y - t[0]) / slope_lo, x)
        return np.where(y > t[-1], s[-1] + (y - t[-1]) / slope_hi, x)

    top = ax.secondary_xaxis("top", functions=(fwd, inv))
    top.set_xlabel("tokens seen")
    top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))


def plot_loss(m: Metrics, path: Path) -> None:
    """Train loss (raw + smoothed) and validation loss against the step."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    tr, ev = m.train, m.evals
    if m.n_train:
        win = min(_window_rows(tr["step"]), max(1, m.n_train // 20))  # less lag than MaxVio's window
        if win > 1:
            ax.plot(tr["step"], tr["loss"], color="tab:blue", alpha=0.25, lw=0.8, label="train loss")
            ax.plot(tr["step"], smooth(tr["loss"], win), color="tab:blue", lw=2,
                    label=f"train loss ({win}-point moving average)")
        else:  # too few points to smooth
            ax.plot(tr["step"], tr["loss"], color="tab:blue", lw=1.5, label="train loss")
        _tokens_axis(ax, tr["step"], tr["tokens"])
        finite = tr["loss"][np.isfinite(tr["loss"])]
        if finite.size > 10:  # keep the first steps' huge losses from flattening the rest
            lo, hi = np.min(finite), np.quantile(finite[finite.size // 20:], 0.995)
            if np.isfinite(hi) and hi > lo:
                ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    if m.n_evals:
        ax.plot(ev["step"], ev["val_loss"], "o-", color="tab:orange", lw=1.5, ms=5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    save_figure(fig, path, dpi=120)


def plot_maxvio(m: Metrics, path: Path) -> None:
    """MaxVio_batch (raw + 100-step moving average) and MaxVio_global points against the step."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    tr, ev = m.train, m.evals
    drew = False
    if m.n_train and np.any(np.isfinite(tr["maxvio_batch"])):
        win = _window_rows(tr["step"])
        raw = dict(alpha=0.25, lw=0.8) if win > 1 else dict(lw=1.5)  # logged too sparsely to smooth
        ax.plot(tr["step"], tr["maxvio_batch"], color="tab:green", label="MaxVio_batch", **raw)
        if win > 1:
            ax.plot(tr["step"], smooth(tr["maxvio_batch"], win), color="tab:green", lw=2,
                    label=f"MaxVio_batch ({SMOOTH_STEPS}-step moving average)")
        drew = True
    if m.n_evals and np.any(np.isfinite(ev["maxvio_global"])):
        ax.plot(ev["step"], ev["maxvio_global"], "D", color="tab:red", ms=6, label="MaxVio_global (validation set)")
        drew = True
    if not drew:
        ax.text(0.5, 0.5, "no MaxVio logged (dense model?)", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MaxVio = (max load − mean load) / mean load")
    ax.set_title("Expert load imbalance (MaxVio, mean over MoE layers; 0 = perfectly balanced)")
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(loc="upper right")
    save_figure(fig, path, dpi=120)


def plot_expert_load(load: np.ndarray, layers: list[int], path: Path) -> None:
    """Heatmap of ``load [L, E]``; the colour scale is centred (white) on the uniform share 1/E."""
    n_layers, n_experts = load.shape
    uniform = 1.0 / n_experts
    fig = Figure(figsize=(min(16, max(8.5, 5 + 0.08 * n_experts)), min(12, 2.4 + 0.2 * n_layers)), layout="constrained")
    ax = fig.add_subplot()
    vmax = max(2 * uniform, float(load.max()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=vmax)
    im = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, label="share of the layer's routed tokens")
    # The two halves of the bar have different scales: tick each half evenly, and name 1/E.
    ticks = [*np.linspace(0.0, uniform, 3), *np.linspace(uniform, vmax, 4)[1:]]
    cbar.set_ticks(ticks, labels=[f"1/E = {t:.3g}" if t == uniform else f"{t:.3g}" for t in ticks])
    cbar.ax.axhline(uniform, color="black", ls="--", lw=1.5)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(n_layers, 20), integer=True))
    ax.yaxis.set_major_formatter(
        FuncFormatter(lambda v, _: str(layers[int(round(v))]) if 0 <= round(v) < n_layers else "")
    )
    ax.set_title(f"Expert load on the validation set (E = {n_experts} routed experts)\n"
                 "white = uniform share 1/E (dashed on the colour bar), red = over, blue = under", fontsize=10)
    save_figure(fig, path, dpi=120)


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def _summary(run_dir: Path, m: Metrics, load: tuple[np.ndarray, list[int]] | None) -> str:
    tr, ev = m.train, m.evals
    lines = [f"# Run report: {run_dir.name}", ""]
    rows: list[tuple[str, str]] = []
    if m.n_evals:
        i_last = m.n_evals - 1
        vl = ev["val_loss"]
        i_best = int(np.nanargmin(vl)) if np.any(np.isfinite(vl)) else i_last
        for label, i in (("final", i_last), ("best", i_best)):
            rows.append((f"{label} val loss (step {int(ev['step'][i])})", _fmt(ev["val_loss"][i], ".4f")))
            rows.append((f"{label} val perplexity", _fmt(ev["val_ppl"][i], ".2f")))
            rows.append((f"{label} val bits per byte", _fmt(ev["val_bpb"][i], ".4f")))
        fin = ev["maxvio_global"][np.isfinite(ev["maxvio_global"])]
        rows.append(("final MaxVio_global", _fmt(fin[-1] if fin.size else math.nan, ".4f")))
    else:
        rows.append(("validation", "no evaluation lines in metrics.jsonl"))
    if m.n_train:
        last = tr["step"][-1]
        recent = tr["step"] > last - SMOOTH_STEPS
        mv = tr["maxvio_batch"][recent]
        mv = mv[np.isfinite(mv)]
        rows.append((f"MaxVio_batch (mean of the last {SMOOTH_STEPS} steps)",
                     _fmt(mv.mean() if mv.size else math.nan, ".4f")))
        loss = tr["loss"][recent]
        loss = loss[np.isfinite(loss)]
        rows.append((f"train loss (mean of the last {SMOOTH_STEPS} steps)",
                     _fmt(loss.mean() if loss.size else math.nan, ".4f")))
        tok = tr["tokens"][np.isfinite(tr["tokens"])]
        seen = tok[-1] if tok.size else math.nan
        rows.append(("optimizer steps", f"{int(last):,}"))
        rows.append(("tokens seen", f"{int(seen):,} ({_si(seen)})" if math.isfinite(seen) else "n/a"))
        tps = tr["tokens_per_s"][np.isfinite(tr["tokens_per_s"])]
        rows.append(("throughput (median tokens/s)", f"{np.median(tps):,.0f}" if tps.size else "n/a"))
        lr = tr["lr"][np.isfinite(tr["lr"])]
        rows.append(("peak / final learning rate", f"{lr.max():.3g} / {lr[-1]:.3g}" if lr.size else "n/a"))
    if load is not None:
        arr, layers = load
        r, e = np.unravel_index(int(np.argmax(arr)), arr.shape)
        uniform = 1.0 / arr.shape[1]
        rows.append(("largest expert share (validation)",
                     f"{arr[r, e]:.4f} = {arr[r, e] / uniform:.2f}× uniform (layer {layers[r]}, expert {e})"))
    lines += ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if m.skipped_last_line:
        lines += ["_The last line of metrics.jsonl was incomplete and was skipped._", ""]
    lines += ["## Loss", "", "![loss](loss.png)", "", "## Load balance", "", "![maxvio](maxvio.png)", ""]
    if load is not None:
        lines += ["![expert load](expert_load.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/report/{loss,maxvio,expert_load}.png`` and ``summary.md``; return the summary's path.

    Raises :class:`ReportError` when ``metrics.jsonl`` is missing or unreadable.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    load = read_expert_load(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(metrics, out / "loss.png")
    plot_maxvio(metrics, out / "maxvio.png")
    if load is not None:
        plot_expert_load(*load, out / "expert_load.png")
    else:
        (out / "expert_load.png").unlink(missing_ok=True)  # stale from an earlier report
    summary = out / "summary.md"
    write_text(summary, _summary(run_dir, metrics, load))
    return summary
