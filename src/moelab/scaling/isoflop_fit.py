"""The fits of an IsoFLOP sweep (:mod:`moelab.scaling.isoflop`), from its result rows:

* **per budget** a parabola ``loss = c2·x² + c1·x + c0`` in ``x = log10 M``; its vertex
  ``x* = −c1/(2·c2)`` gives ``M_opt(C) = 10^x*`` and ``D_opt(C) = C / M_opt(C)``. A budget counts only
  when the parabola is convex and its vertex lies inside the sampled M range;
* **across budgets** a least-squares line in log-log space: ``M_opt = k·C^a`` and ``D_opt = C/M_opt =
  (1/k)·C^b`` with ``b = 1 − a`` (exactly, since D_opt is derived from M_opt). DeepSeek LLM found
  a = 0.5243 (Chinchilla 0.49, OpenAI 0.73).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moelab.errors import DataError
from moelab.scaling.laws import D_OPT, M_OPT, PowerLaw


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
        fit.update(M_opt={**law.as_dict(), "r2": r2},
                   D_opt={"coef": 1 / law.coef, "exponent": 1 - law.exponent, "r2": r2},
                   a=law.exponent, b=1 - law.exponent)
    else:
        fit.update(M_opt=None, D_opt=None, a=None, b=None)
        notes.append(f"{len(used)} budget(s) with an interior minimum; the power law needs at least 2")
    return fit


__all__ = ["Parabola", "fit_isoflop", "fit_parabola", "fit_power_law"]
