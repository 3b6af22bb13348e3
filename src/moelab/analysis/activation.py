"""Gradient-based parameter activation and LLMDcos (docs/methods.md §7, arXiv 2405.17799).

    model, tok = load_causal_lm("smollm2")
    a = parameter_activation(model, load_samples("shakespeare", tok, 16, 256), name="shakespeare")
    b = parameter_activation(model, load_samples("runs/tasks/arith-train.jsonl", tok, 16, 256, shots=3))
    gamma = a.threshold(2e-5, "absolute")
    N = a.counts(gamma)                      # {layer: #weights with A > γ}
    cos = llmdcos(a, b)                      # {layer: LLMDcos}

Legend: s a sample (token sequence), w one weight, D(s) the logit of the top next token at the last
position of s, L decoder layers.

**Activation.** ``A(s, w) = |D(s, w) − D(s, 0)| ≈ |w · ∂D/∂w|`` (first order: the change of D if w alone
were zeroed). One forward and one backward of ``D`` per sample (``D = max(logits[-1])``, whose gradient is
that of the top token's logit), in eval mode and in the model's dtype (the original used fp16), then
``A(w) = mean_s A(s, w)``. Samples are also summed in two halves (even / odd samples), so that
LLMDcos between the halves of one dataset gives a within-domain baseline.

**Scope** (:func:`activation_scope`): every parameter with ≥ 2 dimensions inside a decoder layer
(``...layers.{i}....``) whose matrix (its last two dims) has largest dim ≤ ``max_dim`` = 15000 — the
original's rule, which keeps q, k, v, o, gate, up and down and drops embeddings and the head. Routers
(a module named ``gate`` or ``router``: moelab's ``mlp.gate``, Mixtral's ``block_sparse_moe.gate``) are
left out: they are not among the paper's matrices, and their weights move outputs only through the
gates, not through the (non-differentiable) expert choice. For moelab models this means MLA's
``q_a_proj``/``q_b_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``; the dense
MLP's and the shared experts' ``gate/up/down_proj``; and the **routed experts as stored at run time**:
``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``. Each weight of a stacked tensor
is one weight w, so counts and LLMDcos are the same as with the per-expert Hugging Face tensors
``experts.{e}.{gate,up,down}_proj.weight`` (splitting is a reshape); :meth:`ActivationScores.expert_counts`
gives the per-expert split. An expert that no token of a sample chose has zero gradient, so A = 0.

**Activated weights.** ``N_i = #{w in layer i : A(w) > γ}``. **[UNCERTAIN] γ**: the paper uses 2e-5
(32-layer models) and 5e-6 (40 layers), the released code 2e-6 for 32 layers; the default here is
``activation_threshold = 2e-5`` with ``activation_threshold_mode = "absolute"``. Tiny or untrained models
have other logit scales; ``"quantile"`` takes γ as that quantile of all A values in scope (q = 0.9 ->
the top 10 % of weights count as activated), which makes counts comparable across models.

**LLMDcos.** Per layer, with v1, v2 the layer's concatenated A vectors on two datasets:
``Σ|v1 ⊙ v2| / (‖v1‖ ‖v2‖)`` (A ≥ 0, so this is their cosine); 1 for identical vectors, symmetric.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moelab.common.figures import save_figure
from moelab.common.progress import progress_bar
from moelab.errors import ConfigError, DataError
from moelab.lm.logits import forward_logits, model_device

#: The old name of :func:`moelab.lm.logits.forward_logits` (``lm_logits(model, ids, last_only=True)``),
#: kept for callers of this module's API.
lm_logits = forward_logits

MAX_DIM = 15000
DEFAULT_THRESHOLD = 2e-5
THRESHOLD_MODES = ("absolute", "quantile")
#: Published γ values (docs/methods.md §7): paper 32 / 40 layers, released code 32 layers.
PUBLISHED_THRESHOLDS = {"paper_32_layers": 2e-5, "paper_40_layers": 5e-6, "code_32_layers": 2e-6}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROUTER = re.compile(r"(?:^|\.)(gate|router)\.[^.]+$")


# ----------------------------------------------------------------------------------------------
# scope
# ----------------------------------------------------------------------------------------------
@dataclass
class ScopeParam:
    """One parameter in scope: its name, decoder layer, the tensor, and E when it stacks E experts."""

    name: str
    layer: int
    param: nn.Parameter
    experts: int | None = None


def activation_scope(model: nn.Module, max_dim: int = MAX_DIM) -> list[ScopeParam]:
    """The parameters A is measured on (see the module docstring), in ``named_parameters`` order."""
    stacked = _stacked_expert_params(model)
    out = []
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        if m is None or p.dim() < 2 or _ROUTER.search(name) or max(p.shape[-2:]) > max_dim:
            continue
        out.append(ScopeParam(name, int(m.group(1)), p, p.shape[0] if name in stacked else None))
    if not out:
        raise ConfigError(f"{type(model).__name__} has no weight matrices inside decoder layers "
                          "('...layers.<i>....' with >= 2 dims and largest dim <= max_dim); parameter "
                          "activation needs a decoder-only transformer")
    return out


def _stacked_expert_params(model: nn.Module) -> set[str]:
    """Names of 3-D parameters that stack routed experts (moelab ``RoutedExperts``, or any ``experts``
    module holding ``[E, ·, ·]`` tensors)."""
    names = set()
    for mod_name, mod in model.named_modules():
        if mod_name.endswith("experts") and not mod_name.endswith("shared_experts"):
            for pn, p in mod.named_parameters(recurse=False):
                if p.dim() == 3:
                    names.add(f"{mod_name}.{pn}")
    return names


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------
@dataclass
class ActivationScores:
    """Σ_s A(s, w) of every parameter in scope, kept in two halves (even / odd samples).

    Attributes:
        name: dataset label; scope: the :class:`ScopeParam` list (names, layers, stacked experts);
        sums: two dicts name -> float32 tensor shaped like the parameter; n: samples in each half.
    """

    name: str
    scope: list[ScopeParam]
    sums: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
    n: tuple[int, int]
    meta: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return self.n[0] + self.n[1]

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.scope})

    def mean(self, name: str, part: str | int = "all") -> torch.Tensor:
        """A(w) of one parameter averaged over all samples (``"all"``) or over half 0 / 1."""
        if part == "all":
            return (self.sums[0][name] + self.sums[1][name]) / max(self.n_samples, 1)
        if part not in (0, 1):
            raise ConfigError(f"part must be 'all', 0 or 1 (got {part!r})")
        if self.n[part] == 0:
            raise DataError(f"half {part} of {self.name} holds no samples; measure at least 2 samples")
        return self.sums[part][name] / self.n[part]

    def layer_sizes(self) -> dict[int, int]:
        """``{layer: number of weights in scope}``."""
        out: dict[int, int] = {}
        for s in self.scope:
            out[s.layer] = out.get(s.layer, 0) + s.param.numel()
        return out

    def threshold(self, value: float = DEFAULT_THRESHOLD, mode: str = "absolute") -> float:
        """γ: ``value`` itself (``absolute``) or the ``value``-quantile of all A (``quantile``)."""
        if mode not in THRESHOLD_MODES:
            raise ConfigError(f"unknown activation_threshold_mode {mode!r}; use one of {', '.join(THRESHOLD_MODES)}")
        if mode == "absolute":
            if not value >= 0:
                raise ConfigError(f"an absolute activation_threshold must be >= 0 (got {value})")
            return float(value)
        if not 0 <= value < 1:
            raise ConfigError(f"a quantile activation_threshold must be in [0, 1) (got {value}); e.g. 0.9 "
                              "counts the top 10% of weights as activated")
        flat = torch.cat([self.mean(s.name).reshape(-1) for s in self.scope])
        k = min(max(int(math.floor(value * flat.numel())), 1), flat.numel())
        return float(flat.kthvalue(k).values)

    def counts(self, gamma: float, part: str | int = "all") -> dict[int, int]:
        """``{layer: N_i}`` with ``N_i = #{w in layer i : A(w) > γ}``."""
        out = dict.fromkeys(self.layers, 0)
        for s in self.scope:
            out[s.layer] += int((self.mean(s.name, part) > gamma).sum())
        return out

    def expert_counts(self, gamma: float) -> dict[int, list[int]]:
        """``{layer: [activated weights of routed expert e, summed over its stacked tensors]}``."""
        out: dict[int, list[int]] = {}
        for s in self.scope:
            if s.experts is None:
                continue
            c = (self.mean(s.name) > gamma).reshape(s.experts, -1).sum(1).tolist()
            prev = out.get(s.layer, [0] * s.experts)
            out[s.layer] = [a + b for a, b in zip(prev, c, strict=True)]
        return out

    def summary(self) -> dict:
        """Per-layer mean / max A and sizes (JSON-ready)."""
        per: dict[int, dict] = {}
        for s in self.scope:
            a = self.mean(s.name)
            d = per.setdefault(s.layer, {"weights": 0, "sum": 0.0, "max": 0.0})
            d["weights"] += a.numel()
            d["sum"] += float(a.double().sum())
            d["max"] = max(d["max"], float(a.max()))
        return {str(k): {"weights": v["weights"], "mean_A": v["sum"] / v["weights"], "max_A": v["max"]}
                for k, v in sorted(per.items())}


def parameter_activation(model: nn.Module, samples: Sequence[torch.Tensor], name: str = "data",
                         max_dim: int = MAX_DIM, progress: bool = False) -> ActivationScores:
    """Measure ``A(s, w) = |w · ∂D/∂w|`` on every sample and sum it per weight (module docstring).

    Args:
        model: a moelab or transformers causal LM; its mode and ``requires_grad`` flags are restored.
        samples: int64 token sequences ``[T_i]`` (one forward + backward each).
        name: dataset label kept in the result.
        max_dim: the scope's largest-dimension limit.
    """
    if not samples:
        raise DataError(f"{name}: no samples to measure; give at least one sequence")
    scope = activation_scope(model, max_dim)
    device = model_device(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    sums: tuple[dict, dict] = ({}, {})
    for half in sums:
        for s in scope:
            half[s.name] = torch.zeros(s.param.shape, dtype=torch.float32, device=device)
    n = [0, 0]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for s in scope:
            s.param.requires_grad_(True)
        model.eval()
        with progress_bar(list(samples), progress, f"activation {name}") as items:
            for k, ids in enumerate(items):
                for s in scope:
                    s.param.grad = None
                ids = ids.reshape(1, -1).to(device)
                with torch.enable_grad():
                    top = forward_logits(model, ids, last_only=True)[0, -1].max()    # D(s)
                    top.backward()
                acc = sums[k % 2]
                for s in scope:
                    g = s.param.grad
                    if g is not None:
                        acc[s.name] += (s.param.detach() * g).abs_().float()
                n[k % 2] += 1
    finally:
        for s in scope:
            s.param.grad = None
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return ActivationScores(name, scope, sums, (n[0], n[1]), {"max_dim": max_dim})


def llmdcos(a: ActivationScores, b: ActivationScores, part_a: str | int = "all",
            part_b: str | int = "all") -> dict[int, float]:
    """``{layer: Σ|v1⊙v2| / (‖v1‖‖v2‖)}`` with v1, v2 the layer's A vectors (NaN if either is all zero)."""
    if [s.name for s in a.scope] != [s.name for s in b.scope]:
        raise ConfigError("LLMDcos compares activation scores of the same model (same parameters in scope); "
                          f"{a.name} and {b.name} differ")
    dot = dict.fromkeys(a.layers, 0.0)
    na, nb = dict(dot), dict(dot)
    for s in a.scope:
        x, y = a.mean(s.name, part_a).double(), b.mean(s.name, part_b).double()
        dot[s.layer] += float((x * y).abs().sum())
        na[s.layer] += float((x * x).sum())
        nb[s.layer] += float((y * y).sum())
    return {i: dot[i] / math.sqrt(na[i] * nb[i]) if na[i] > 0 and nb[i] > 0 else float("nan") for i in dot}


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def plot_activation(counts: dict[str, dict[int, int]], sizes: dict[int, int], gamma: float,
                    path: str | os.PathLike, ratios: dict[int, float] | None = None,
                    sparsity: float | None = None) -> Path:
    """Activated weights per layer (count and share of the layer) for each dataset; with ``ratios``, the
    layer-wise prune ratios S_i on a second axis."""
    from matplotlib.figure import Figure

    layers = sorted(sizes)
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax = fig.subplots()
    for k, (name, c) in enumerate(counts.items()):
        ax.plot(layers, [c[i] / sizes[i] for i in layers], "o-", ms=3.5, color=f"C{k % 10}",
                label=f"{name} (N_i / layer size)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"share of weights with A > γ = {gamma:.3g}")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ratios is not None:
        ax2 = ax.twinx()
        ax2.plot(layers, [ratios[i] for i in layers], "s--", ms=3, color="0.35",
                 label="layer-wise prune ratio S_i" + (f" (S = {sparsity:g})" if sparsity is not None else ""))
        if sparsity is not None:
            ax2.axhline(sparsity, color="0.6", lw=0.8)
        ax2.set_ylabel("prune ratio S_i")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=min(len(labels), 3))
    ax.set_title("Parameter activation per layer (gradient-based, docs/methods.md §7)")
    return save_figure(fig, path)


def plot_llmdcos(curves: dict[str, dict[int, float]], path: str | os.PathLike) -> Path:
    """LLMDcos per layer for each named pair (e.g. cross-domain and within-domain halves)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    for k, (label, c) in enumerate(curves.items()):
        layers = sorted(c)
        ax.plot(layers, [c[i] for i in layers], "o-" if k == 0 else "o--", ms=3.5, color=f"C{k % 10}",
                label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("LLMDcos")
    ax.set_ylim(top=1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Activation similarity per layer (LLMDcos)")
    return save_figure(fig, path)


def counts_array(counts: dict[int, int]) -> np.ndarray:
    """Layer-ordered N_i as a float array (for :func:`moelab.analysis.pruning.layerwise_sparsity`)."""
    return np.array([counts[i] for i in sorted(counts)], dtype=np.float64)


__all__ = ["DEFAULT_THRESHOLD", "MAX_DIM", "PUBLISHED_THRESHOLDS", "THRESHOLD_MODES", "ActivationScores",
           "ScopeParam", "activation_scope", "counts_array", "llmdcos", "lm_logits", "parameter_activation",
           "plot_activation", "plot_llmdcos"]
