"""Plots of a routing analysis (:mod:`moelab.analysis.routing`): expert load per layer, and the overlap
between datasets. PNG files, written atomically.

    plot_routing_load(stats, "out/routing_load.png")          # stats: RoutingStats of collect_routing
    plot_routing_overlap(report, "out/routing_overlap.png")   # report: routing_report(stats)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moelab.analysis.routing import RoutingStats
from moelab.common.figures import save_figure


def plot_routing_load(stats: Sequence[RoutingStats], path: str | os.PathLike) -> Path:
    """One layer × expert heatmap of ``load`` per dataset (shared colour scale, 1/E marked on the bar);
    with exactly two datasets a third panel shows their difference."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    D = len(stats)
    L, E = stats[0].counts.shape
    panels = D + (D == 2)
    fig = Figure(figsize=(max(4.0, 0.28 * E + 1.8) * panels, 0.45 * L + 1.8), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    vmax = max(float(s.load.max()) for s in stats)
    for ax, s in zip(axes, stats, strict=False):
        im = ax.imshow(s.load, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        _axes(ax, s.layers, E, f"{s.name}\n({s.tokens:,} tokens)")
    cb = fig.colorbar(im, ax=axes[:D].tolist(), shrink=0.9, label="share of routed slots")
    cb.ax.axhline(1 / E, color="w", lw=1.5)
    if D == 2:
        diff = stats[0].load - stats[1].load
        lim = max(float(np.abs(diff).max()), 1e-9)
        im = axes[2].imshow(diff, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0, -lim, lim),
                            interpolation="nearest")
        _axes(axes[2], stats[0].layers, E, f"{stats[0].name} − {stats[1].name}")
        fig.colorbar(im, ax=axes[2], shrink=0.9, label="load difference")
    fig.suptitle("Routed-expert load per MoE layer")
    return save_figure(fig, path)


def _axes(ax, layers, E, title):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    step = max(1, E // 16)
    ax.set_xticks(range(0, E, step))


def plot_routing_overlap(report: dict, path: str | os.PathLike) -> Path:
    """Dataset × dataset matrices of the layer-averaged Jaccard, cosine and JS overlap (top), and each pair's
    per-layer curves (bottom)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names, layers = report["names"], report["layers"]
    D = len(names)
    fig = Figure(figsize=(13, 3.2 + 0.35 * D + 3.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    axes = top.subplots(1, 3)
    titles = {"jaccard": f"Jaccard of {report['coverage']:.0%}-cover sets", "cosine": "cosine of loads",
              "js": "JS divergence (bits)"}
    for ax, (m, title) in zip(axes, titles.items(), strict=True):
        mat = np.array(report["overlap_matrix"][m], dtype=float)
        im = ax.imshow(mat, cmap="magma_r" if m == "js" else "magma", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(D), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(D), names, fontsize=8)
        for i in range(D):
            for j in range(D):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="w" if (mat[i, j] < 0.5) != (m == "js") else "k")
        top.colorbar(im, ax=ax, shrink=0.8)
    axes = bottom.subplots(1, 3, sharex=True)
    for ax, m in zip(axes, titles, strict=True):
        for k, (pair, o) in enumerate(report["overlap"].items()):
            ax.plot(layers, [o["layers"][str(layer)][m] for layer in layers], "o-", color=f"C{k % 10}",
                    label=pair.replace("|", " vs "))
        ax.set_xlabel("layer")
        ax.set_ylabel(m)
        ax.set_ylim(0, 1.02 if m != "js" else max(0.1, 1.2 * max(
            (v[m] for o in report["overlap"].values() for v in o["layers"].values()), default=0.1)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if report["overlap"]:
        axes[0].legend(fontsize=8)
    fig.suptitle("Expert overlap between datasets (per MoE layer below)")
    return save_figure(fig, path)


__all__ = ["plot_routing_load", "plot_routing_overlap"]
