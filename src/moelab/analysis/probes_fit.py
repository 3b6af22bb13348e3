"""Probes and their metrics (:mod:`moelab.analysis.probes`): closed-form ridge, an MLP baseline, the
shuffled-label control, and the test-split numbers of each, state by state.

    probe = fit_ridge(X_NH, y_N, lam=0.1)                  # RidgeProbe: pred = X @ w + b
    m = probe_metrics(probe.predict(X_test), values, groups)   # rho, r2, mse, aacc, n, r2_within
    lp = probe_layers(states_SNH, values, splits, "a")     # LayerProbes: metrics and ridge probe per state

Legend: N problems, S residual states, H hidden size, K targets solved at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from moelab.analysis.probes_settings import ProbeError
from moelab.common.progress import Bars

if TYPE_CHECKING:
    from rich.console import Console


# --------------------------------------------------------------------------------------------------
# probes and metrics
# --------------------------------------------------------------------------------------------------
@dataclass
class RidgeProbe:
    """``pred = X @ w + b``; ``w`` [H] float64, ``b`` scalar."""

    w: np.ndarray
    b: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        """``X`` [N, H] → [N]."""
        return np.asarray(X, dtype=np.float64) @ self.w + self.b


def fit_ridge(X: np.ndarray, y: np.ndarray, lam: float = 0.1) -> RidgeProbe | list[RidgeProbe]:
    """Ridge regression ``min ‖Xw + b − y‖² + λ‖w‖²`` (b unpenalised) in closed form.

    ``X`` [N, H]; ``y`` [N] → one probe, or [N, K] → K probes sharing one solve with
    ``XcᵀXc + λI`` (Xc, yc: X and y minus their means). Solved in float64 with torch's LAPACK.
    """
    X_NH = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    y_NK = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    single = y_NK.dim() == 1
    if single:
        y_NK = y_NK[:, None]
    x_mean, y_mean = X_NH.mean(0), y_NK.mean(0)
    Xc = X_NH - x_mean
    gram_HH = Xc.T @ Xc
    gram_HH.diagonal().add_(lam)
    w_HK = torch.linalg.solve(gram_HH, Xc.T @ (y_NK - y_mean))
    b_K = y_mean - x_mean @ w_HK
    probes = [RidgeProbe(w_HK[:, k].numpy().copy(), float(b_K[k])) for k in range(w_HK.shape[1])]
    return probes[0] if single else probes


def _group_means(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each entry of ``y`` [N] replaced by the mean of its group (``groups`` [N])."""
    _, inv = np.unique(groups, return_inverse=True)
    return (np.bincount(inv, weights=y) / np.bincount(inv))[inv]


def probe_metrics(pred_log2: np.ndarray, values: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """Metrics of log2 predictions against true positive values (both [N]).

    ``rho`` Pearson correlation of prediction and log2(value); ``r2`` 1 − SS_res/SS_tot in log2 units;
    ``mse`` mean squared log2 error; ``aacc`` share with |2^pred − value| < 0.01·value. ``rho`` and ``r2``
    are None when the targets (or predictions) are constant.

    With ``groups`` [N] (the operand length of each problem) also ``r2_within`` = 1 − SS_res / Σ(y − ȳ_g)²,
    R² against the per-group means: the share of the variation *within* one operand length the probe
    explains. Plain R² is inflated by the digit count, which alone (and the prompt length with it)
    pins log2(value) down to about ±1.7.
    """
    p = np.asarray(pred_log2, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    y = np.log2(x)
    res = float(((y - p) ** 2).sum())
    tot = float(((y - y.mean()) ** 2).sum())
    rho = None
    if len(y) > 1 and p.std() > 0 and y.std() > 0:
        rho = float(np.corrcoef(p, y)[0, 1])
    with np.errstate(over="ignore"):
        aacc = float(np.mean(np.abs(np.exp2(p) - x) < 0.01 * x)) if len(x) else None
    out = {"rho": rho, "r2": 1.0 - res / tot if tot > 0 else None, "mse": res / len(y) if len(y) else None,
           "aacc": aacc, "n": int(len(y))}
    if groups is not None:
        within = float(((y - _group_means(y, np.asarray(groups))) ** 2).sum())
        out["r2_within"] = 1.0 - res / within if within > 0 else None
    return out


def length_baseline_r2(values: np.ndarray, groups: np.ndarray) -> float | None:
    """R² of predicting log2(value) by the mean of its group (operand length) alone — what a probe that
    only knows the digit count would reach. ``values``, ``groups`` [N]."""
    y = np.log2(np.asarray(values, dtype=np.float64))
    tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - _group_means(y, np.asarray(groups))) ** 2).sum()) / tot if tot > 0 else None


def fit_mlp_probe(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                  hidden: int = 256, epochs: int = 10, seed: int = 0, lr: float = 1e-3,
                  batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """An MLP probe H → hidden → 1 (ReLU) on standardised inputs/targets; returns ``predict(X [N, H]) → [N]``.

    Adam for ``epochs`` passes over the train set; the weights of the epoch with the lowest val MSE are kept.
    """
    Xt = torch.as_tensor(np.asarray(X_train), dtype=torch.float32)
    mu, sd = Xt.mean(0), Xt.std(0) + 1e-6
    y_mu, y_sd = float(np.mean(y_train)), float(np.std(y_train)) + 1e-6
    yt = (torch.as_tensor(np.asarray(y_train), dtype=torch.float32) - y_mu) / y_sd
    Xv = (torch.as_tensor(np.asarray(X_val), dtype=torch.float32) - mu) / sd
    yv = (torch.as_tensor(np.asarray(y_val), dtype=torch.float32) - y_mu) / y_sd
    Xt = (Xt - mu) / sd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(Xt.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_state = math.inf, None
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(Xt), generator=gen).split(batch_size):
                loss = nn.functional.mse_loss(net(Xt[idx]).squeeze(-1), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                val = float(nn.functional.mse_loss(net(Xv).squeeze(-1), yv)) if len(Xv) else 0.0
            if val < best or best_state is None:
                best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = net((torch.as_tensor(np.asarray(X), dtype=torch.float32) - mu) / sd).squeeze(-1)
        return (z.double() * y_sd + y_mu).numpy()

    return predict


@dataclass
class LayerProbes:
    """Probes of one target across states: ``metrics[l]`` dicts and the ridge probe of each state."""

    target: str
    metrics: list[dict]
    probes: list[RidgeProbe] = field(repr=False)


def probe_layers(states_SNH: np.ndarray, values: np.ndarray, splits: Sequence[str], target: str = "",
                 lam: float = 0.1, mlp_hidden: int = 256, mlp_epochs: int = 10, seed: int = 0,
                 groups: Sequence[int] | None = None, progress: bool = False,
                 console: Console | None = None) -> LayerProbes:
    """Fit and score the probes of one target at every state.

    ``states_SNH`` [S, N, H]; ``values`` [N] (entries ≤ 0 or NaN — no usable answer — are left out);
    ``splits`` N × ``train``/``val``/``test``; ``groups`` [N] operand lengths (adds ``r2_within``). Per
    state: ``ridge`` and ``shuffled`` (ridge on permuted train labels) and, with ``mlp_epochs > 0``,
    ``mlp`` test metrics, plus ``w_norm`` = ‖w‖.
    """
    values = np.asarray(values, dtype=np.float64)
    splits = np.asarray(splits)
    ok = np.isfinite(values) & (values > 0)
    tr, va, te = (ok & (splits == s) for s in ("train", "val", "test"))
    if tr.sum() < 2 or te.sum() < 2:
        raise ProbeError(f"too few usable examples for target {target!r}: {int(tr.sum())} train, {int(te.sum())} "
                         "test; use more problems (--n) or more generated tokens (--max-new-tokens)")
    y = np.where(ok, np.log2(np.where(ok, values, 1.0)), np.nan)
    y_shuf = y[tr][np.random.default_rng(seed).permutation(int(tr.sum()))]
    g_te = None if groups is None else np.asarray(groups)[te]
    metrics, probes = [], []
    with Bars(progress, console=console) as bar:
        task = bar.add_task(f"probes {target}", total=len(states_SNH))
        for layer, X in enumerate(states_SNH):
            ridge, shuffled = fit_ridge(X[tr], np.stack([y[tr], y_shuf], 1), lam)
            row = {"layer": layer, "ridge": probe_metrics(ridge.predict(X[te]), values[te], g_te),
                   "shuffled": probe_metrics(shuffled.predict(X[te]), values[te], g_te),
                   "w_norm": float(np.linalg.norm(ridge.w))}
            if mlp_epochs > 0:
                mlp = fit_mlp_probe(X[tr], y[tr], X[va], y[va], mlp_hidden, mlp_epochs, seed + layer)
                row["mlp"] = probe_metrics(mlp(X[te]), values[te], g_te)
            metrics.append(row)
            probes.append(ridge)
            bar.advance(task)
    return LayerProbes(target, metrics, probes)


__all__ = ["LayerProbes", "RidgeProbe", "fit_mlp_probe", "fit_ridge", "length_baseline_r2", "probe_layers",
           "probe_metrics"]
