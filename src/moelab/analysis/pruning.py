"""Wanda pruning with uniform or activation-derived layer-wise ratios, and perplexity (docs/methods.md §7).

    S_i = layerwise_sparsity(counts_array(N), 0.5)      # N_i from moelab.analysis.activation
    saved = snapshot(model)
    report = wanda_prune(model, calib, dict(zip(layers, S_i)))
    ppl = perplexity(model, eval_samples)
    restore(model, saved)

Legend: L decoder layers (i = 1..L in the formula), S the overall sparsity, W a weight matrix
``[out, in]``, X its calibration inputs ``[tokens, in]``.

**Layer-wise ratios** (α = 2, β = 0.2)::

    N'_i = sigmoid((N_i − mean N) / std N + α / i)      # std = 0 -> the z-score is 0
    S_i  = S + β·S·(1 − N'_i · L / Σ_j N'_j)

so mean_i S_i = S exactly and S_i < S(1 + β): layers with few activated weights are pruned more.
**[UNCERTAIN]** i is 1-based (docs/methods.md §7); std is the population std (ddof 0; the sources do not say —
it does not change mean S_i = S). N_i are raw counts, as in docs/methods.md; where layers differ in size (moelab's
dense first layers next to MoE layers) a bigger layer counts more weights — pass shares N_i / size instead
if that is not wanted (the ratios depend on N only through its z-scores).

**Wanda** (arXiv 2306.11695): score ``|W_jk| · ‖X_k‖₂`` (‖X_k‖₂ over all calibration tokens), and in each
output row j zero the lowest-scoring weights so that exactly ``round((1 − S_i) · in)`` stay; no weight is
updated. Matrices are the activation scope (:func:`moelab.analysis.activation.activation_scope`: attention
and MLP projections in the decoder layers, no router, embeddings or head). Stacked routed experts
``[E, rows, in]`` are pruned per expert row with each expert's own input norms: the tokens routed to
expert e for ``gate_up_proj``, and its SwiGLU hidden ``silu(x W_g^T) ⊙ (x W_u^T)`` on them for
``down_proj`` (an expert that no calibration token chose has zero scores; its lowest-index weights go).

As in Wanda's released code the model is pruned layer by layer (``sequential=True``): the calibration
hidden states enter layer i through the already pruned layers 0..i−1, the norms of layer i are measured,
layer i is pruned, and its outputs are recomputed for layer i+1. ``sequential=False`` measures every layer
on the dense model's hidden states instead. The original calibrates on 128 × 2048 tokens of C4; here the
calibration set is whatever the caller passes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moelab.analysis.activation import MAX_DIM, ScopeParam, activation_scope
from moelab.common.figures import save_figure
from moelab.common.progress import progress_bar
from moelab.data.samples import batched
from moelab.errors import ConfigError, DataError
from moelab.lm.logits import forward_logits, model_device
from moelab.lm.nll import token_nll

ALPHA, BETA = 2.0, 0.2


# ----------------------------------------------------------------------------------------------
# ratios
# ----------------------------------------------------------------------------------------------
def layerwise_sparsity(counts: Sequence[float], sparsity: float, alpha: float = ALPHA,
                       beta: float = BETA) -> np.ndarray:
    """``[L]`` per-layer ratios S_i from activated counts N_i (layer order, i = 1..L); mean = ``sparsity``."""
    N = np.asarray(counts, dtype=np.float64)
    if N.ndim != 1 or N.size == 0:
        raise ConfigError(f"counts must be a non-empty 1-D sequence (got shape {N.shape})")
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1) (got {sparsity})")
    L = N.size
    std = N.std()
    z = (N - N.mean()) / std if std > 0 else np.zeros(L)
    n_prime = 1 / (1 + np.exp(-(z + alpha / np.arange(1, L + 1))))
    S = sparsity + beta * sparsity * (1 - n_prime * L / n_prime.sum())
    if S.max() >= 1:
        raise ConfigError(f"sparsity {sparsity} with beta {beta} gives a layer ratio >= 1; lower one of them")
    return S


# ----------------------------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖X‖₂``: weight ``[..., out, in]`` and input norms ``[..., in]`` -> ``[..., out, in]``."""
    return weight.detach().abs().float() * in_norm.float().unsqueeze(-2)


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask ``[..., out, in]``, True = keep: in each row the ``round((1 − S)·in)`` highest scores
    (ties broken towards the higher index, deterministically)."""
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1) (got {sparsity})")
    n_in = scores.shape[-1]
    n_prune = n_in - int(round((1 - sparsity) * n_in))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        order = torch.argsort(scores, dim=-1, stable=True)                     # ascending
        keep.scatter_(-1, order[..., :n_prune], False)
    return keep


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (name == "layers" or name.endswith(".layers")):
            return mod
    raise ConfigError(f"{type(model).__name__} has no '.layers' module list; Wanda pruning needs a "
                      "decoder-only transformer")


class _Stop(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs = args, kwargs


class _Collector:
    """Sums of squared inputs ``Σ_t x_tk²`` of the matrices of one decoder layer, via forward hooks."""

    def __init__(self, model: nn.Module, params: list[ScopeParam]):
        from moelab.model.experts import RoutedExperts

        self.sq: dict[str, torch.Tensor] = {}
        self.handles = []
        experts_done = set()
        for s in params:
            mod_name, _, pname = s.name.rpartition(".")
            mod = model.get_submodule(mod_name)
            if isinstance(mod, nn.Linear) and pname == "weight":
                self.handles.append(mod.register_forward_hook(self._linear(s.name)))
            elif isinstance(mod, RoutedExperts) and pname in ("gate_up_proj", "down_proj"):
                if mod_name not in experts_done:
                    experts_done.add(mod_name)
                    self.handles.append(mod.register_forward_hook(self._experts(mod_name, mod)))
            else:
                self.remove()
                raise ConfigError(f"cannot prune {s.name} ({type(mod).__name__}): Wanda here handles nn.Linear "
                                  "weights and moelab's stacked routed experts; load DeepSeek checkpoints with "
                                  "moelab (load_causal_lm) rather than transformers")

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sq[key] = self.sq[key] + value if key in self.sq else value

    def _linear(self, name: str):
        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self._add(name, (x * x).sum(0))                                    # [in]
        return hook

    def _experts(self, mod_name: str, mod):
        def hook(m, args, out):
            x_NH, idx_NK = args[0].detach().float(), args[1]
            E, two_i, H = mod.gate_up_proj.shape
            inner = two_i // 2
            N, K = idx_NK.shape
            flat = idx_NK.reshape(-1)                                           # [N·K]
            tok = torch.arange(N, device=flat.device).repeat_interleave(K)
            sq_gu = torch.zeros(E, H, device=x_NH.device).index_add_(0, flat, x_NH[tok] ** 2)
            sq_dn = torch.zeros(E, inner, device=x_NH.device)
            w_gu = mod.gate_up_proj.detach().float()
            for e in torch.unique(flat).tolist():
                xe = x_NH[tok[flat == e]]                                      # [n_e, H]
                gu = xe @ w_gu[e].T                                            # [n_e, 2I]
                h = F.silu(gu[:, :inner]) * gu[:, inner:]
                sq_dn[e] += (h * h).sum(0)
            self._add(f"{mod_name}.gate_up_proj", sq_gu)
            self._add(f"{mod_name}.down_proj", sq_dn)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _layer_call(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def wanda_prune(model: nn.Module, calib: Sequence[torch.Tensor], sparsity: float | Mapping[int, float],
                batch_size: int = 4, sequential: bool = True, max_dim: int = MAX_DIM,
                progress: bool = False) -> dict:
    """Prune ``model`` in place with Wanda (module docstring) and return what was zeroed.

    Args:
        calib: calibration sequences (int64 ``[T_i]``); equal-length neighbours are batched.
        sparsity: one S for every layer, or ``{decoder layer: S_i}`` covering every layer in scope.
    Returns ``{"layers": {i: {"target", "zeros", "weights", "sparsity"}}, "zeros", "weights", "sparsity"}``.
    """
    scope = activation_scope(model, max_dim)
    by_layer: dict[int, list[ScopeParam]] = {}
    for s in scope:
        by_layer.setdefault(s.layer, []).append(s)
    if isinstance(sparsity, Mapping):
        missing = sorted(set(by_layer) - set(sparsity))
        if missing:
            raise ConfigError(f"no sparsity given for layer(s) {missing}; give one ratio per decoder layer")
        target = {i: float(sparsity[i]) for i in by_layer}
    else:
        target = dict.fromkeys(by_layer, float(sparsity))
    for i, s in target.items():
        if not 0 <= s < 1:
            raise ConfigError(f"layer {i}: sparsity must be in [0, 1) (got {s})")
    batches = list(batched(calib, batch_size))
    if not batches:
        raise DataError("Wanda needs calibration sequences; give at least one")
    layers = _decoder_layers(model)
    device = model_device(model)
    was_training = model.training
    model.eval()
    # hidden states entering layer 0, with the call's other arguments (RoPE tables, masks, ...)
    inputs: list[tuple[tuple, dict]] = []

    def catch(mod, args, kwargs):
        raise _Stop(args, kwargs)

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                forward_logits(model, ids.to(device))
            except _Stop as stop:
                inputs.append((stop.args_, stop.kwargs))
    finally:
        handle.remove()
    if len(inputs) != len(batches):
        raise ConfigError("the decoder layers were not reached by the model's forward; cannot prune it")
    report: dict = {"layers": {}}
    total_z = total_n = 0
    try:
        with progress_bar(list(enumerate(layers)), progress, "Wanda pruning") as items:
            for i, layer in items:
                params = by_layer.get(i, [])
                coll = _Collector(model, params)
                try:
                    outs = [_layer_call(layer, a, k) for a, k in inputs]
                finally:
                    coll.remove()
                z = n = 0
                for s in params:
                    if s.name not in coll.sq:
                        raise ConfigError(f"{s.name} saw no calibration input; is it used in the forward pass?")
                    keep = row_prune_mask(wanda_scores(s.param, coll.sq[s.name].sqrt()), target[i])
                    s.param.mul_(keep.to(s.param.dtype))
                    z += int((~keep).sum())
                    n += keep.numel()
                if params:
                    report["layers"][i] = {"target": target[i], "zeros": z, "weights": n, "sparsity": z / n}
                    total_z, total_n = total_z + z, total_n + n
                if sequential and params:
                    outs = [_layer_call(layer, a, k) for a, k in inputs]
                inputs = [((o, *a[1:]), k) for o, (a, k) in zip(outs, inputs, strict=True)]
    finally:
        model.train(was_training)
    report.update(zeros=total_z, weights=total_n, sparsity=total_z / max(total_n, 1))
    return report


def snapshot(model: nn.Module, max_dim: int = MAX_DIM) -> dict[str, torch.Tensor]:
    """Copies of the weights Wanda may change (to :func:`restore` after a pruning run)."""
    return {s.name: s.param.detach().clone() for s in activation_scope(model, max_dim)}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in saved.items():
        params[name].copy_(value)


# ----------------------------------------------------------------------------------------------
# perplexity
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: nn.Module, samples: Sequence[torch.Tensor], batch_size: int = 4,
               progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) over every position of ``samples`` (int64 ``[T_i]``, T_i >= 2)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    nll, count = 0.0, 0
    try:
        batches = list(batched([s for s in samples if len(s) >= 2], batch_size))
        with progress_bar(batches, progress, "perplexity") as items:
            for ids_BT in items:
                ids_BT = ids_BT.to(device)
                # position t predicts token t + 1: every position but the last is scored
                s, n = token_nll(forward_logits(model, ids_BT)[:, :-1], ids_BT[:, 1:])
                nll, count = nll + s, count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("perplexity needs sequences of at least 2 tokens")
    return math.exp(nll / count)


def plot_pruning(results: dict, path: str | os.PathLike, dense_ppl: float | None = None) -> Path:
    """Perplexity vs overall sparsity: ``results = {"uniform": {S: ppl}, "layerwise": {S: ppl}}``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.subplots()
    for k, (label, curve) in enumerate(results.items()):
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], "o-", color=f"C{k % 10}", label=f"Wanda, {label} ratios")
        for x in xs:
            ax.annotate(f"{curve[x]:.1f}", (x, curve[x]), textcoords="offset points", xytext=(4, 4 - 12 * k),
                        fontsize=7, color=f"C{k % 10}")
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="0.4", ls=":", label=f"dense ({dense_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity S (share of pruned weights in scope)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Wanda: uniform vs activation-based layer-wise ratios")
    return save_figure(fig, path)


__all__ = ["ALPHA", "BETA", "layerwise_sparsity", "perplexity", "plot_pruning", "restore", "row_prune_mask",
           "snapshot", "wanda_prune", "wanda_scores"]
