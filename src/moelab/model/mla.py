"""Multi-head Latent Attention (DeepSeek-V2 §2.1; docs/methods.md §4).

Legend: B batch, T new tokens, S cached + new tokens, N heads, C ``kv_lora_rank`` (latent),
R ``qk_rope_head_dim``, P ``qk_nope_head_dim``, V ``v_head_dim``.

    c_Q = q_a_layernorm(q_a_proj(h));  q = q_b_proj(c_Q) -> [N, P | R]     (or q = q_proj(h))
    [c_KV | k_pe] = kv_a_proj_with_mqa(h);  c_KV = kv_a_layernorm(c_KV)   # k_pe: ONE shared head
    [k_nope | v]_n = kv_b_proj(c_KV)
    score_n = (q_nope_n · k_nope_n + RoPE(q_pe_n) · RoPE(k_pe)) · softmax_scale

Two equal ways to attend (``attn_impl``):

* ``naive``: expand ``c_KV`` into per-head keys and values (``N·(P+R)`` and ``N·V`` per token).
* ``absorb``: fold ``W_UK`` into the query and ``W_UV`` into the output, and attend against the
  cached latent directly: ``score = (W_UKᵀ q_nope)·c_KV + q_pe·k_pe``; ``o_n = W_UV_n Σ p c_KV``.
* ``auto`` (default): naive for multi-token forwards (training, prefill: scores cost ``P+R`` per
  head instead of ``C+R``), absorbed for one-token decode steps (no re-expansion of the prefix).

Either way the cache holds only ``[c_KV | k_pe]`` (one ``[B, S, C+R]`` buffer per layer, so the
absorbed keys are the cache itself and the values a view of it: nothing is copied per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.model.cache import KVCache
from moelab.model.norm import RMSNorm
from moelab.model.rope import rotate


class MultiHeadLatentAttention(nn.Module):
    """MLA. forward(x ``[B, T, H]``, cos/sin ``[B|1, T, R]`` (rope tables), mask ``[B|1, 1, T, S]`` bool or None,
    cache) -> ``[B, T, H]``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        self.impl = cfg.attn_impl
        H, N, Dqk = cfg.hidden_size, self.n_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, N * Dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # inner norms: eps 1e-6 always
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, N * Dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_rank, N * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(N * self.v_dim, H, bias=cfg.attention_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        N = self.n_heads
        q_BTNd = self._query(x).view(B, T, N, self.nope + self.rope)
        q_nope, q_pe = q_BTNd.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        # the key's rope part rotates as one more head beside the query's: one rotation, not two (5 kernels
        # instead of 8, which counts at every decode step)
        pe = rotate(torch.cat((q_pe, k_pe[:, :, None]), dim=2), cos, sin, self.interleave)   # [B, T, N+1, R]
        q_pe, k_pe = pe[:, :, :N], pe[:, :, N]                                  # [B, T, N, R], [B, T, R]
        kv = torch.cat((self.kv_a_layernorm(c_kv), k_pe), dim=-1)               # [B, T, C+R]
        if cache is not None:
            (kv,) = cache.update(self.layer_idx, kv)                            # [B, S, C+R]

        if self.impl == "naive" or (self.impl == "auto" and T > 1):
            out = self._naive(q_nope, q_pe, kv, mask)
        elif T == 1:
            out = self._absorbed_step(q_nope, q_pe, kv, mask)
        else:
            out = self._absorbed(q_nope, q_pe, kv, mask)
        return self.o_proj(out.reshape(B, T, N * self.v_dim))

    def _naive(self, q_nope, q_pe, kv_lat, mask):
        B, S, _ = kv_lat.shape
        N = self.n_heads
        c_kv, k_pe = kv_lat.split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, N, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, N, self.rope)), dim=-1)   # [B, S, N, P+R]
        q = torch.cat((q_nope, q_pe), dim=-1)                                               # [B, T, N, P+R]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale)                # [B, N, T, V]
        return o.transpose(1, 2)                                                            # [B, T, N, V]

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` ``[N, P, C]`` and ``W_UV`` ``[N, V, C]``: views of ``kv_b_proj.weight``."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def _absorbed(self, q_nope, q_pe, kv, mask):
        B, T, N, _ = q_nope.shape
        w_uk, w_uv = self._up_weights()
        q_lat = torch.einsum("btnp,npc->btnc", q_nope, w_uk)                   # [B, T, N, C]
        # All heads share one key/value "head" (the latent), so fold heads into query rows:
        # row t*N + n attends with query (t, n) against [c_KV | k_pe].
        q = torch.cat((q_lat, q_pe), dim=-1).reshape(B, 1, T * N, self.kv_rank + self.rope)
        if mask is not None:
            mask = mask.repeat_interleave(N, dim=2)                             # [B|1, 1, T*N, S]
        o_lat = F.scaled_dot_product_attention(q, kv[:, None], kv[:, None, :, :self.kv_rank], attn_mask=mask,
                                               scale=self.scale)
        o_lat = o_lat.view(B, T, N, self.kv_rank)
        return torch.einsum("btnc,nvc->btnv", o_lat, w_uv)                      # [B, T, N, V]

    def _absorbed_step(self, q_nope, q_pe, kv, mask):
        """One decode step (T = 1), the same math as :meth:`_absorbed` in fewer, batched ops: per step
        the cost is dominated by op count, not FLOPs. kv ``[B, S, C+R]`` -> ``[B, 1, N, V]``."""
        B, _, N, _ = q_nope.shape
        w_uk, w_uv = self._up_weights()
        q_lat = torch.bmm(q_nope.view(B, N, self.nope).transpose(0, 1), w_uk)   # [N, B, C]
        q = torch.cat((q_lat.transpose(0, 1), q_pe.reshape(B, N, self.rope)), dim=-1)     # [B, N, C+R]
        # the softmax scale rides on the GEMM (alpha), the mask on one select: no extra elementwise kernels
        scores = torch.baddbmm(q.new_empty(B, N, kv.shape[1]), q, kv.transpose(1, 2), beta=0, alpha=self.scale)
        if mask is not None:                                                    # [B|1, 1, 1, S]
            scores = torch.where(mask[:, 0], scores, float("-inf"))            # [B, N, S]
        p = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
        o_lat = torch.bmm(p, kv[:, :, :self.kv_rank])                           # [B, N, C]
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))              # [N, B, V]
        return o.transpose(0, 1)[:, None]                                        # [B, 1, N, V]
