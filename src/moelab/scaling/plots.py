"""The figure of an IsoFLOP sweep: loss vs M per budget with the fitted parabolas, and M_opt / D_opt vs C
with the fitted power laws next to DeepSeek LLM's (written by :func:`moelab.common.figures.save_figure`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moelab.common.figures import save_figure
from moelab.scaling.laws import D_OPT, M_OPT


def plot_isoflop(rows: list[dict], fit: dict, path: Path) -> Path:
    """IsoFLOP curves (left) and the M_opt / D_opt power laws (right), written atomically as PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(12, 4.8))
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
    return save_figure(fig, path, dpi=110)


__all__ = ["plot_isoflop"]
