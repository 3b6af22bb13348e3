"""Parameter, cache and FLOP accounting for a config, without allocating weights (meta device).

* total parameters (tied embeddings counted once);
* activated parameters per token: everything except routed experts, plus K/E of each MoE layer's
  routed experts (input embedding and LM head included, as the DeepSeek papers count them);
* decoding-cache values per token: MLA latent + RoPE key vs the per-head K/V an MHA cache holds
  (docs/methods.md §4, Table 1 of DeepSeek-V2);
* non-embedding FLOPs per token, DeepSeek LLM's ``M = 72·L·d² + 12·L·d·l_seq`` (docs/methods.md §10),
  and the MoE-aware ``6·N_active_non_embedding + 12·L·d·l_seq``.

Whether the weights fit in host memory is :mod:`moelab.model.memory` (its names are re-exported here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moelab.config import ModelConfig
from moelab.model.memory import allocation_error, available_memory, check_weights_fit
from moelab.model.transformer import DeepSeekForCausalLM


@dataclass
class ModelBudget:
    total_params: int
    activated_params: int
    embedding_params: int          # input embedding + LM head (once if tied)
    routed_expert_params: int
    activated_routed_expert_params: int
    moe_layers: int
    dense_layers: int
    cache_elems_per_token: int     # decoding cache over all layers
    mha_cache_elems_per_token: int  # what per-head K and V would need
    cache_bytes_per_token: int     # at cache_dtype
    mha_cache_bytes_per_token: int
    cache_dtype: str
    seq_len: int
    flops_per_token: float         # 72·L·d² + 12·L·d·l_seq (DeepSeek LLM formula)
    flops_per_token_active: float  # 6·N_active_non_embedding + 12·L·d·l_seq

    def as_dict(self) -> dict:
        return asdict(self)


def model_budget(cfg: ModelConfig, seq_len: int | None = None, cache_dtype: torch.dtype = torch.bfloat16
                 ) -> ModelBudget:
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    total = routed = embed = 0
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        n = p.numel()
        total += n
        if ".mlp.experts." in name:
            routed += n
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            embed += n
    K, E = cfg.num_experts_per_tok or 0, cfg.n_routed_experts or 0
    act_routed = routed * K // E if E else 0
    activated = total - routed + act_routed
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    l_seq = seq_len or pretraining_context(cfg)
    attn_flops = 12 * L * d * l_seq
    elem = torch.tensor([], dtype=cache_dtype).element_size()
    return ModelBudget(
        total_params=total, activated_params=activated, embedding_params=embed,
        routed_expert_params=routed, activated_routed_expert_params=act_routed,
        moe_layers=len(cfg.moe_layer_ids), dense_layers=L - len(cfg.moe_layer_ids),
        cache_elems_per_token=cfg.cache_elems_per_token(),
        mha_cache_elems_per_token=cfg.mha_cache_elems_per_token(),
        cache_bytes_per_token=cfg.cache_elems_per_token() * elem,
        mha_cache_bytes_per_token=cfg.mha_cache_elems_per_token() * elem,
        cache_dtype=str(cache_dtype).removeprefix("torch."), seq_len=l_seq,
        flops_per_token=72 * L * d * d + attn_flops,
        flops_per_token_active=6 * (activated - embed) + attn_flops,
    )


def pretraining_context(cfg: ModelConfig) -> int:
    """The context length the FLOPs formula should use by default: the pre-YaRN length when the
    model was extended with YaRN (e.g. 4096 for DeepSeek-V2/V3), else ``max_position_embeddings``."""
    if cfg.rope_scaling is not None:
        return min(cfg.rope_scaling.original_max_position_embeddings, cfg.max_position_embeddings)
    return cfg.max_position_embeddings


__all__ = ["ModelBudget", "allocation_error", "available_memory", "check_weights_fit", "model_budget",
           "pretraining_context"]
