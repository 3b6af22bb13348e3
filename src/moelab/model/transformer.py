"""The decoder-only language model: embeddings, L pre-norm blocks, final norm, LM head.

Legend: B batch, T new tokens, S cached + new tokens, H hidden, V vocabulary.

Module and parameter names follow Hugging Face's DeepseekV2/V3 (``model.layers.{i}.self_attn...``,
``model.layers.{i}.mlp.gate.weight``, ``lm_head.weight``) so checkpoint conversion is a thin mapping
(:mod:`moelab.interop`); only the routed experts live stacked (see :mod:`moelab.model.experts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn

from moelab.config import ModelConfig
from moelab.model.cache import DecodingCache, KVCache, StaticCache, StaticSlot
from moelab.model.experts import RoutedExperts, compute_dtype
from moelab.model.mha import GroupedQueryAttention
from moelab.model.mla import MultiHeadLatentAttention
from moelab.model.mlp import SwiGLU
from moelab.model.moe import DeepSeekMoE
from moelab.model.norm import RMSNorm
from moelab.model.rope import RotaryEmbedding
from moelab.model.router import Router


@dataclass
class LMOutput:
    logits: torch.Tensor                 # [B, T, V]
    cache: DecodingCache | StaticCache | None = None


# FSDP2 hooks the unshard-before-backward on the output tensors it finds; torch 2.11 finds them with pytree,
# which sees inside a dataclass only when it is registered (without this the root's weights, e.g. lm_head,
# are freed when backward needs them: "setStorage: ... out of bounds for storage of size 0").
if hasattr(pytree, "register_dataclass"):
    pytree.register_dataclass(LMOutput)


def attention_mask_for(T: int, past: int, padding: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask ``[B|1, 1, T, S]`` (True = may attend), or None when every key is visible.

    ``padding`` ``[B, S]`` marks real tokens with 1. A padded query still sees itself, so no row is
    empty (an all-masked row would turn into NaN and leak through 0·NaN in the value product).
    """
    if padding is None and T == 1:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]                                  # [1, 1, T, S]
    if padding is not None:
        mask = mask & padding[:, None, None, :S].to(torch.bool, copy=False).to(device)
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; x ``[B, T, H]`` -> ``[B, T, H]``.

    ``mlp`` is a DeepSeekMoE layer or, for the first ``first_k_dense_replace`` layers (and those
    skipped by ``moe_layer_freq``), a dense SwiGLU of width ``intermediate_size``.
    """

    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        attn_cls = MultiHeadLatentAttention if cfg.use_mla else GroupedQueryAttention
        self.self_attn = attn_cls(cfg, idx)
        self.mlp = DeepSeekMoE(cfg, idx) if cfg.is_moe_layer(idx) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepSeekModel(nn.Module):
    """Embeddings + blocks + final norm. forward(input_ids ``[B, T]``) -> hidden ``[B, T, H]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, *, inputs_embeds=None):
        """``inputs_embeds`` ``[B, T, H]`` replaces the embedding of ``input_ids`` (a vision-language model
        fills image positions with image features)."""
        B, T = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        past = cache.seq_len if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None]
        mask = attention_mask_for(T, past, attention_mask, device)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb.tables(position_ids, compute_dtype(x))      # [B|1, T, R] (rope.rotate)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                    slots: list[StaticSlot], run_layer: Callable | None = None) -> torch.Tensor:
        """One token per row against a static cache: input_ids and position_ids ``[B, 1]``, mask ``[B, 1, 1, L]``
        over the cache's ``L`` slots (True = attend; the caller hides the slots after the one written now),
        ``slots`` from :meth:`StaticCache.step_slots` -> hidden ``[B, 1, H]``. Same shapes at every step, no
        host sync. ``run_layer(layer, x, cos, sin, mask, slot)`` replaces calling the layer (a compiled one)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.tables(position_ids, compute_dtype(x))      # [B, 1, R] (rope.rotate)
        for layer, slot in zip(self.layers, slots, strict=True):
            x = layer(x, cos, sin, mask, slot) if run_layer is None else run_layer(layer, x, cos, sin, mask, slot)
        return self.norm(x)


class DeepSeekForCausalLM(nn.Module):
    """A DeepSeek-style causal LM (DeepSeekMoE + MLA/MHA + RoPE/YaRN).

    forward(input_ids ``[B, T]`` int64, attention_mask ``[B, S]`` or None, position_ids ``[B, T]`` or
    None, cache :class:`DecodingCache`, :class:`StaticCache` or None) -> :class:`LMOutput` with ``logits``
    ``[B, T, V]``. :meth:`decode_step` is the fixed-shape one-token step over a :class:`StaticCache`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepSeekModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # Module._apply (to_empty, .to, ...) replaces each parameter separately and would untie them.
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int | None = None, device="cpu",
                    dtype: torch.dtype = torch.float32) -> DeepSeekForCausalLM:
        """A freshly initialised model (normal(0, initializer_range) weights, unit norms, zero biases).

        Refuses (a :class:`~moelab.errors.ConfigError`) a CPU model whose weights do not fit in the
        memory available, before allocating anything.
        """
        from moelab.model.memory import allocation_error, check_weights_fit

        with torch.device("meta"):
            model = cls(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        check_weights_fit(cfg, n_params, dtype, device)
        try:
            model.to_empty(device=device)
            model.init_weights(seed)
            return model.to(dtype)
        except (MemoryError, RuntimeError) as e:
            error = allocation_error(e, cfg, n_params, dtype)
            if error is None:
                raise
        del model
        raise error from None

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Draw every weight; with ``seed``, from that seed, leaving the global random state (CPU and the
        model's GPUs: ``manual_seed`` reseeds both) as it was."""
        gpus = sorted({p.device.index or 0 for p in self.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=gpus, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            std = self.config.initializer_range
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=std)
                elif isinstance(m, RoutedExperts | Router):     # stacked expert weights, router weight: drawn
                    m.reset_parameters(std)
                elif isinstance(m, RMSNorm | RotaryEmbedding):  # ones, and RoPE tables: nothing to draw
                    m.reset_parameters()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE tables) after loading into an empty model."""
        self.model.rotary_emb.reset_parameters()

    def new_cache(self) -> DecodingCache:
        return DecodingCache(self.config.num_hidden_layers)

    def new_static_cache(self, batch: int, capacity: int) -> StaticCache:
        """A :class:`StaticCache` for ``batch`` sequences of up to ``capacity`` tokens (prompt + new), on the
        model's device in its dtype: ``[B, L, C+R]`` per layer for MLA, K and V ``[B, L, G, D]`` for MHA/GQA."""
        cfg = self.config
        if cfg.use_mla:
            shapes = ((cfg.kv_lora_rank + cfg.qk_rope_head_dim,),)
        else:
            shapes = ((cfg.kv_heads, cfg.attn_head_dim),) * 2
        return StaticCache([shapes] * cfg.num_hidden_layers, batch, capacity, self.dtype, self.device)

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                    slots: list[StaticSlot], run_layer: Callable | None = None) -> torch.Tensor:
        """Logits ``[B, V]`` of one static-cache decode step (:meth:`DeepSeekModel.decode_step`)."""
        h = self.model.decode_step(input_ids, position_ids, mask, slots, run_layer)
        return self.lm_head(h[:, -1])

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: DecodingCache | StaticCache | None = None,
                logits_to_keep: int = 0, *, inputs_embeds: torch.Tensor | None = None) -> LMOutput:
        h = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds=inputs_embeds)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return LMOutput(logits=self.lm_head(h), cache=cache)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
