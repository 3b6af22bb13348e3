"""Files of a number-probe run (:mod:`moelab.analysis.probes`): results.json, problems.jsonl and probes.png,
each written atomically.

    paths = write_results(run_probes(model, tok), Path("runs/probes"))    # {"results", "problems", "png"}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moelab.common.atomic import write_text
from moelab.common.figures import save_figure
from moelab.common.jsonio import write_json

# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
_COLORS = {"a": "tab:blue", "b": "tab:orange", "o": "tab:green", "sum": "tab:red"}


def plot_probes(results: dict, path: Path) -> Path:
    """Ridge-probe ρ, R², R² within one operand length and AAcc against the residual state (PNG, atomic).

    One colour per target; the R² panels add the MLP probe (dashed), the R² panel the shuffled-label
    control (dotted) and the length-only baselines (thin grey); the steered states are shaded.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def col(rows, kind, key):
        return [np.nan if r.get(kind, {}).get(key) is None else r[kind][key] for r in rows]

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    steer = results.get("steering") or {}
    panels = (("rho", "Pearson ρ (test)"), ("r2", "R² (test)"), ("r2_within", "R² within one operand length (test)"),
              ("aacc", "AAcc: |2^pred − x| < 1% of x (test)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for tgt, rows in results["layers"].items():
            xs = [r["layer"] for r in rows]
            ax.plot(xs, col(rows, "ridge", key), color=_COLORS.get(tgt), marker=".", label=f"{tgt} ridge")
            if key in ("r2", "r2_within") and "mlp" in rows[0]:
                ax.plot(xs, col(rows, "mlp", key), color=_COLORS.get(tgt), ls="--", lw=1, label=f"{tgt} MLP")
            if key == "r2":
                ax.plot(xs, col(rows, "shuffled", key), color=_COLORS.get(tgt), ls=":", lw=1,
                        label=f"{tgt} shuffled labels")
        if key == "r2":
            for tgt, base in (results.get("baselines", {}).get("length_only_r2") or {}).items():
                if base is not None:
                    ax.axhline(base, color=_COLORS.get(tgt), lw=0.6, alpha=0.5)
        if steer.get("layers"):
            ax.axvspan(min(steer["layers"]) - 0.5, max(steer["layers"]) + 0.5, color="0.9", zorder=0)
        ax.set_xlabel("residual state (0 = embeddings, l = output of block l−1)")
        ax.set_title(label, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[1:3]:
        ax.set_ylim(max(-1.05, ax.get_ylim()[0]), 1.02)
    axes[3].set_ylim(-0.02, 1.02)
    axes[0].legend(*axes[1].get_legend_handles_labels(), fontsize=7, ncol=3, loc="center")   # ρ has room
    name = results["model"].get("name") or "model"
    title = f"Linear number probes — {name} ({results['data']['n']} problems, log2 targets)"
    if steer:
        runs = "; ".join(f"α={r['alpha']:g}: {r['conditions']['probe']['success']:.2f} / "
                         f"{r['conditions']['random']['success']:.2f} / {r['conditions']['null']['success']:.2f}"
                         for r in steer["runs"])
        title += (f"\nsteering at states {min(steer['layers'])}–{max(steer['layers'])} (shaded), success probe / "
                  f"random / null direction: {runs}")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)


def write_results(results: dict, out: Path) -> dict[str, Path]:
    """Write ``out/results.json`` (without the problem rows), ``out/problems.jsonl`` and ``out/probes.png``,
    each atomically (temporary file, then rename); non-finite numbers become null."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results.get("problems", [])
    summary = {k: v for k, v in results.items() if k != "problems"}
    paths = {"problems": out / "problems.jsonl", "png": out / "probes.png", "results": out / "results.json"}
    write_text(paths["problems"], "".join(json.dumps(r) + "\n" for r in rows))
    plot_probes(summary, paths["png"])
    write_json(paths["results"], summary)
    return paths


__all__ = ["plot_probes", "write_results"]
