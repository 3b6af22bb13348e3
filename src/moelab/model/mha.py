"""Plain multi-head / grouped-query attention with RoPE, for dense baselines, DeepSeekMoE
(which uses MHA) and DeepSeek-VL2-Tiny-style models (``use_mla = false``).

Legend: B batch, T new tokens, S cached + new tokens, N query heads, G key/value heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.model.cache import KVCache
from moelab.model.rope import rotate


class GroupedQueryAttention(nn.Module):
    """MHA (G = N) or GQA (G < N). forward(x ``[B, T, H]``, cos/sin ``[B|1, T, D]`` (rope tables),
    mask ``[B|1, 1, T, S]`` bool or None, cache) -> ``[B, T, H]``. Cache: rotated K and V ``[B, S, G, D]``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        H, N, G, D = cfg.hidden_size, self.n_heads, self.n_kv, self.head_dim
        self.q_proj = nn.Linear(H, N * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, G * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, G * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(N * D, H, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        N, G, D = self.n_heads, self.n_kv, self.head_dim
        q = rotate(self.q_proj(x).view(B, T, N, D), cos, sin, self.interleave)
        k = rotate(self.k_proj(x).view(B, T, G, D), cos, sin, self.interleave)
        v = self.v_proj(x).view(B, T, G, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                           # [B, S, G, D]
        if G != N:
            k = k.repeat_interleave(N // G, dim=2)
            v = v.repeat_interleave(N // G, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale)    # [B, N, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, N * D))
