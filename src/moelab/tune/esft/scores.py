"""ESFT expert scores: how much each routed expert of each MoE layer is used on the task data.

Legend: B batch, T sequence length, N = B·T tokens, E routed experts, K experts per token.

**Scores.** For MoE layer l and routed expert i, over N_s sequences j of L_j tokens::

    gate   g_i^l = (1/N_s) Σ_j (1/L_j) Σ_k g^l_{i,k}     g = the weight the MoE applies to expert i's
                                                          output for token k (0 if i was not chosen)
    token  r_i^l = (1/N_s) Σ_j (1/L_j) Σ_k 1[i chosen for k] / K

The gate is the value the block really multiplies by, i.e. after ``norm_topk_prob`` renormalisation and
``routed_scaling_factor`` (V2-Lite: softmax probabilities, not renormalised, scale 1, so a layer's gate
scores sum to the mean top-6 probability mass, ≈0.3–0.5). Every token picks K experts, so a layer's
token scores sum to 1 by construction. Sequences are packed (no padding): every position counts.

**Normalisation** (``norm``, the ``esft_score_norm`` setting, [UNCERTAIN] in docs/methods.md §5):

* ``per_layer`` (default) — the paper's definition and what the released ``summary.json`` files hold:
  nothing is rescaled. Token rows sum to 1 per layer by construction; gate rows stay raw means (so the
  gate threshold p is on raw means, p = 0.1 in the paper).
* ``legacy_across_layers`` — the released ``generate_expert_config.py``: each score is divided by the
  same expert's sum over all MoE layers (``scores / scores.sum(axis=0)`` on a ``[layers, E]`` array);
  both tables are rescaled. An expert that no layer ever chose scores 0 (the script would give NaN).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moelab.common.progress import progress_bar
from moelab.errors import ConfigError, DataError, did_you_mean
from moelab.model.moe import DeepSeekMoE
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.esft.layers import moe_layers

SCORE_NORMS = ("per_layer", "legacy_across_layers")
SCORE_KINDS = ("token", "gate")


def score_experts(model: DeepSeekForCausalLM, batches: Iterable[torch.Tensor], progress: bool = False,
                  norm: str = "per_layer") -> dict:
    """Token and gate relevance scores of every routed expert on ``batches`` (see the module docstring).

    Args:
        model: a moelab MoE model; it runs in eval mode under ``torch.no_grad`` (its mode is restored).
        batches: int64 token ids ``[B, T]`` (or ``[T]``), packed sequences without padding; each row
            is one sequence j of length L_j = T.
        progress: show a progress bar on stderr.
        norm: ``per_layer`` or ``legacy_across_layers``.

    Returns ``{"token_scores": {layer: {expert: float}}, "gate_scores": {...}, "meta": {...}}`` with
    string keys ("1", "0"...), layers in model order, experts 0..E-1; ``meta`` records the number of
    sequences and tokens, K, E and the normalisation.
    """
    if norm not in SCORE_NORMS:
        raise ConfigError(f"unknown score normalisation {norm!r}{did_you_mean(str(norm), SCORE_NORMS)}; "
                          f"use one of {', '.join(SCORE_NORMS)}")
    layers = moe_layers(model)
    cfg = model.config
    E, K, V = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.vocab_size
    device = model.device
    gate_sum = {i: torch.zeros(E, dtype=torch.float64, device=device) for i in layers}   # Σ_j per-seq means
    token_sum = {i: torch.zeros(E, dtype=torch.float64, device=device) for i in layers}

    def observe(moe: DeepSeekMoE, routing) -> None:
        N = routing.indices.shape[0]
        B, T = routing.batch_shape if routing.batch_shape and len(routing.batch_shape) == 2 else (1, N)
        seq_N = torch.arange(N, device=routing.indices.device) // T                    # sequence of each token
        flat = (seq_N[:, None] * E + routing.indices).reshape(-1)                       # [N·K] in [0, B·E)
        weights = routing.weights.detach().reshape(-1).to(torch.float64)
        g_BE = torch.bincount(flat, weights=weights, minlength=B * E).view(B, E)
        c_BE = torch.bincount(flat, minlength=B * E).view(B, E).to(torch.float64)
        gate_sum[moe.layer_idx] += g_BE.sum(0).to(device) / T
        token_sum[moe.layer_idx] += c_BE.sum(0).to(device) / (T * K)

    n_seq = n_tok = 0
    was_training = model.training
    for moe in layers.values():
        moe.routing_observers.append(observe)
    try:
        model.eval()
        with torch.no_grad(), progress_bar(batches, progress, "scoring experts") as items:
            for ids in items:
                ids = _check_ids(ids, V)
                model.model(ids.to(device))          # the backbone is enough: no logits needed
                n_seq += ids.shape[0]
                n_tok += ids.numel()
    finally:
        for moe in layers.values():
            moe.routing_observers[:] = [fn for fn in moe.routing_observers if fn is not observe]
        model.train(was_training)
    if n_seq == 0:
        raise DataError("no sequences to score: the data gave no batches; give at least one sequence")

    order = sorted(layers)
    token = torch.stack([token_sum[i] for i in order]).cpu() / n_seq             # [layers, E]
    gate = torch.stack([gate_sum[i] for i in order]).cpu() / n_seq
    if norm == "legacy_across_layers":
        token, gate = _across_layers(token), _across_layers(gate)

    def table(x: torch.Tensor) -> dict:
        return {str(layer): {str(e): float(v) for e, v in enumerate(row.tolist())}
                for layer, row in zip(order, x, strict=True)}

    return {"token_scores": table(token), "gate_scores": table(gate),
            "meta": {"norm": norm, "sequences": n_seq, "tokens": n_tok, "n_routed_experts": E, "top_k": K}}


def _across_layers(x: torch.Tensor) -> torch.Tensor:
    """``x / x.sum(0)`` for ``[layers, E]``; an all-zero column stays 0."""
    col = x.sum(0, keepdim=True)
    return torch.where(col > 0, x / col.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _check_ids(ids, vocab: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"a batch must be a torch tensor of token ids [B, T], got {type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(f"a batch must be token ids of shape [B, T] with T >= 1, got shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError(f"token ids must be integers, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise DataError(f"token id {hi if hi >= vocab else lo} is outside the model's vocabulary (0..{vocab - 1}); "
                        "was the data tokenized with this model's tokenizer?")
    return ids.long()
