"""Routing statistics of a DeepSeekMoE model: how each layer spreads tokens over its routed experts, and
how much two datasets share experts (docs/methods.md §5: tasks concentrate on few, different experts).

    model, tok = load_causal_lm("runs/demo/model")
    stats = [collect_routing(model, load_samples(d, tok, 64, 256, vocab_size=512), name=d)
             for d in ("runs/data/shakespeare", "runs/tasks/arith-train.jsonl")]
    report = routing_report(stats, coverage=0.5)      # the JSON written by `moelab analyze routing`
    plot_routing_load(stats, "out/routing_load.png"); plot_routing_overlap(report, "out/routing_overlap.png")

(``load_samples``: :mod:`moelab.data.samples`; the plots: :mod:`moelab.analysis.routing_plots`.)

Legend: E routed experts, K experts per token, N tokens, L MoE layers, D datasets.

Per dataset, MoE layer l and routed expert e, counted over every (non-padding) token:

* ``load[l, e]``  = #{tokens routed to e} / (N·K)   — the share of the layer's K·N routing slots (Σ_e = 1).
  This is ESFT's token score (§5) over the whole dataset instead of averaged per sequence.
* ``gate[l, e]``  = Σ_tokens g_{e,t} / Σ_tokens Σ_e g_{e,t} — the share of the gate mass (Σ_e = 1).
* ``top_n``       = the summed load of the n most used experts (n = 1, K, 2K by default): 1.0 means all
  routing goes to n experts, n/E means perfectly balanced.
* ``entropy``     = H(load) / ln E ∈ [0, 1] (1 = uniform over all E experts).
* ``cover_set``   = the smallest set of experts whose load reaches ``coverage`` (0.5): experts sorted by
  load (descending, ties by id) and added until the running sum reaches it — ESFT's selection rule with
  p = coverage.
* ``max_vio``     = max_e load / (1/E) − 1 (MaxVio of §3 on this data; 0 = balanced).

Between two datasets a and b, per layer (and averaged over layers):

* ``jaccard`` = |C_a ∩ C_b| / |C_a ∪ C_b| of their cover sets;
* ``cosine``  = load_a · load_b / (‖load_a‖ ‖load_b‖);
* ``js``      = Jensen–Shannon divergence of the two load distributions in bits ∈ [0, 1] (0 = identical).

Datasets (:func:`moelab.data.samples.load_samples`) are token directories (``moelab data prepare``), SFT
JSON Lines files (prompt/completion or messages; packed rows, or k-shot prompts) or any text source of
:mod:`moelab.data.sources` (``shakespeare``, a directory, a glob, a file).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moelab.common.progress import progress_bar
from moelab.data.samples import batched
from moelab.errors import ConfigError, DataError
from moelab.model.layers import moe_layers
from moelab.model.transformer import DeepSeekForCausalLM

DEFAULT_COVERAGE = 0.5


# ----------------------------------------------------------------------------------------------
# collecting routing decisions
# ----------------------------------------------------------------------------------------------
def routed_layers(model) -> dict:
    """Decoder-layer index -> :class:`moelab.model.moe.DeepSeekMoE` block; a ConfigError if there are none."""
    if not isinstance(model, DeepSeekForCausalLM):
        raise ConfigError(f"routing analysis needs routed experts, and {type(model).__name__} is not a moelab "
                          "mixture-of-experts model; give a moelab / DeepSeek checkpoint directory (it loads "
                          "with moelab's MoE layers, whose routing decisions can be observed)")
    layers = moe_layers(model)
    if not layers:
        cfg = model.config
        raise ConfigError(f"routing analysis needs routed experts; this model (n_routed_experts="
                          f"{cfg.n_routed_experts}, {cfg.num_hidden_layers} layers, first_k_dense_replace="
                          f"{cfg.first_k_dense_replace}) has only dense layers. Give a mixture-of-experts "
                          "checkpoint (n_routed_experts > 0)")
    return layers


@dataclass
class RoutingStats:
    """What one dataset's tokens did in every MoE layer.

    Attributes:
        name: dataset label; layers: decoder-layer indices of the MoE layers (L of them);
        counts: int64 ``[L, E]`` (token, expert) assignments; gate: float64 ``[L, E]`` summed gate weights;
        tokens: N tokens seen; sequences: how many sequences; top_k: K.
    """

    name: str
    layers: list[int]
    counts: np.ndarray
    gate: np.ndarray
    tokens: int
    sequences: int
    top_k: int

    @property
    def load(self) -> np.ndarray:
        """``[L, E]`` share of each layer's N·K routing slots (rows sum to 1)."""
        return self.counts / np.maximum(self.counts.sum(1, keepdims=True), 1)

    @property
    def gate_share(self) -> np.ndarray:
        """``[L, E]`` share of each layer's gate mass (rows sum to 1)."""
        return self.gate / np.maximum(self.gate.sum(1, keepdims=True), 1e-300)


@torch.no_grad()
def collect_routing(model, samples: Sequence[torch.Tensor], name: str = "data", batch_size: int = 8,
                    progress: bool = False) -> RoutingStats:
    """Run ``samples`` (int64 ``[T_i]`` sequences, no padding) through ``model`` and count routing decisions.

    Uses the MoE blocks' ``routing_observers``; the model runs in eval mode (its mode is restored) and
    only the backbone runs (no logits).
    """
    layers = routed_layers(model)
    E, K = model.config.n_routed_experts, model.config.num_experts_per_tok
    device = next(model.parameters()).device
    counts = {i: torch.zeros(E, dtype=torch.int64, device=device) for i in layers}
    gate = {i: torch.zeros(E, dtype=torch.float64, device=device) for i in layers}

    def observe(moe, routing) -> None:
        idx = routing.indices.reshape(-1)                                   # [N·K]
        counts[moe.layer_idx] += torch.bincount(idx, minlength=E)
        gate[moe.layer_idx] += torch.bincount(idx, weights=routing.weights.reshape(-1).double(), minlength=E)

    n_tok = n_seq = 0
    was_training = model.training
    for moe in layers.values():
        moe.routing_observers.append(observe)
    try:
        model.eval()
        batches = list(batched(samples, batch_size))
        with progress_bar(batches, progress, f"routing {name}") as items:
            for ids in items:
                model.model(ids.to(device))
                n_tok += ids.numel()
                n_seq += ids.shape[0]
    finally:
        for moe in layers.values():
            moe.routing_observers[:] = [fn for fn in moe.routing_observers if fn is not observe]
        model.train(was_training)
    if n_tok == 0:
        raise DataError(f"{name}: no tokens to route; give at least one sequence")
    order = sorted(layers)
    return RoutingStats(name, order, torch.stack([counts[i] for i in order]).cpu().numpy(),
                        torch.stack([gate[i] for i in order]).cpu().numpy(), n_tok, n_seq, K)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def cover_set(load: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> list[int]:
    """Smallest set of experts (``load`` ``[E]``) whose shares reach ``coverage``, in selection order."""
    if not 0 < coverage <= 1:
        raise ConfigError(f"coverage must be in (0, 1] (got {coverage})")
    order = np.argsort(-np.asarray(load, dtype=np.float64), kind="stable")
    chosen, total = [], 0.0
    for e in order:
        chosen.append(int(e))
        total += float(load[e])
        if total >= coverage - 1e-12:
            break
    return chosen


def normalized_entropy(p: np.ndarray) -> float:
    """H(p) / ln(len(p)) for a distribution ``p`` ``[E]`` (0·ln 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(len(p))) if len(p) > 1 else 0.0


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (∈ [0, 1]) of two distributions ``[E]``."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def layer_metrics(load: np.ndarray, top_k: int, coverage: float = DEFAULT_COVERAGE,
                  top_n: Sequence[int] | None = None) -> dict:
    """The per-layer numbers of the module docstring for one load vector ``[E]``."""
    load = np.asarray(load, dtype=np.float64)
    E = len(load)
    ns = sorted({n for n in (top_n or (1, top_k, 2 * top_k)) if 1 <= n <= E})
    desc = np.sort(load)[::-1]
    cs = cover_set(load, coverage)
    return {"entropy": normalized_entropy(load), "top_n": {str(n): float(desc[:n].sum()) for n in ns},
            "cover_set": cs, "cover_size": len(cs), "max_vio": float(load.max() * E - 1)}


def overlap(load_a: np.ndarray, load_b: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> dict:
    """``{"jaccard", "cosine", "js"}`` between two load vectors ``[E]`` (see the module docstring)."""
    a, b = set(cover_set(load_a, coverage)), set(cover_set(load_b, coverage))
    na, nb = float(np.linalg.norm(load_a)), float(np.linalg.norm(load_b))
    cos = float(np.dot(load_a, load_b) / (na * nb)) if na > 0 and nb > 0 else float("nan")
    return {"jaccard": len(a & b) / len(a | b), "cosine": cos, "js": js_divergence(load_a, load_b)}


def routing_report(stats: Sequence[RoutingStats], coverage: float = DEFAULT_COVERAGE,
                   top_n: Sequence[int] | None = None) -> dict:
    """Everything :func:`collect_routing` measured, as a JSON-ready dict.

    ``{"coverage", "top_k", "n_routed_experts", "layers", "datasets": {name: {"tokens", "sequences",
    "layers": {layer: {"load", "gate_share", "entropy", "top_n", "cover_set", "cover_size", "max_vio"}},
    "mean": {...}}}, "overlap": {"a|b": {"layers": {layer: {"jaccard", "cosine", "js"}}, "mean": {...}}},
    "overlap_matrix": {metric: [[D×D means over layers]]}, "names": [...]}``.
    """
    if not stats:
        raise ConfigError("routing_report needs at least one dataset")
    layers, K, E = stats[0].layers, stats[0].top_k, stats[0].counts.shape[1]
    if any(s.layers != layers or s.counts.shape[1] != E for s in stats):
        raise ConfigError("routing statistics of different models cannot be compared; collect them all with "
                          "the same model")
    out: dict = {"coverage": coverage, "top_k": K, "n_routed_experts": E, "layers": layers,
                 "names": [s.name for s in stats], "datasets": {}, "overlap": {}}
    for s in stats:
        per = {}
        for li, layer in enumerate(layers):
            m = layer_metrics(s.load[li], K, coverage, top_n)
            per[str(layer)] = {"load": s.load[li].tolist(), "gate_share": s.gate_share[li].tolist(), **m}
        mean = {"entropy": _mean(p["entropy"] for p in per.values()),
                "cover_size": _mean(p["cover_size"] for p in per.values()),
                "max_vio": _mean(p["max_vio"] for p in per.values()),
                "top_n": {n: _mean(p["top_n"][n] for p in per.values()) for n in next(iter(per.values()))["top_n"]}}
        out["datasets"][s.name] = {"tokens": s.tokens, "sequences": s.sequences, "layers": per, "mean": mean}
    metrics = ("jaccard", "cosine", "js")
    D = len(stats)
    matrix = {m: [[float("nan")] * D for _ in range(D)] for m in metrics}
    for i in range(D):
        for j in range(D):
            per = {str(layer): overlap(stats[i].load[li], stats[j].load[li], coverage)
                   for li, layer in enumerate(layers)}
            mean = {m: _mean(p[m] for p in per.values()) for m in metrics}
            for m in metrics:
                matrix[m][i][j] = mean[m]
            if i < j:
                out["overlap"][f"{stats[i].name}|{stats[j].name}"] = {"layers": per, "mean": mean}
    out["overlap_matrix"] = matrix
    return out


def _mean(values: Iterable[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(sum(v) / len(v)) if v else float("nan")


__all__ = ["DEFAULT_COVERAGE", "RoutingStats", "collect_routing", "cover_set", "js_divergence", "layer_metrics",
           "normalized_entropy", "overlap", "routed_layers", "routing_report"]
