"""Logits of any causal LM: a moelab :class:`~moelab.model.transformer.DeepSeekForCausalLM` or a
``transformers`` causal LM (e.g. the SmolLM2 of :func:`moelab.interop.hf_lm.load_causal_lm`).

    logits_BTV = forward_logits(model, ids_BT)                          # [B, T, V], fp32
    logits_BTV = forward_logits(model, ids_BT, attention_mask_BT)       # left-padded batch
    logits_B1V = forward_logits(model, ids_BT, last_only=True)          # [B, 1, V]: last position only

Shapes: ``ids_BT`` int64 [B, T]; ``attention_mask_BT`` int/bool [B, T] (1 = real token, 0 = padding);
``logits_BTV`` float32 [B, T, V]. Dimension letters: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch

#: Context length assumed for a model whose config does not say (no ``max_position_embeddings``).
DEFAULT_CONTEXT = 2048


def is_moelab(model) -> bool:
    """True for a moelab DeepSeek model (its forward takes moelab's arguments, not transformers')."""
    # imported here, not at module level: importing moelab.lm stays cheap for CLI start-up
    from moelab.model.transformer import DeepSeekForCausalLM

    return isinstance(model, DeepSeekForCausalLM)


def context_length(model) -> int:
    """The longest sequence the model was built for (``config.max_position_embeddings``)."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else DEFAULT_CONTEXT


def model_device(model) -> torch.device:
    """Where the model's (first) parameters live; inputs are moved there."""
    return next(model.parameters()).device


def forward_logits(model, ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None, *,
                   last_only: bool = False) -> torch.Tensor:
    """``logits`` [B, T, V] (``[B, 1, V]`` with ``last_only``) of either kind of model, in fp32.

    No KV cache is kept (transformers models build one by default; a scoring pass never reuses it).
    Gradients flow through when called under ``torch.enable_grad()`` (the fp32 cast is differentiable).
    """
    kw: dict = {"logits_to_keep": 1} if last_only else {}
    if is_moelab(model):
        out = model(ids_BT, attention_mask=attention_mask_BT, **kw)
    else:
        out = model(input_ids=ids_BT, attention_mask=attention_mask_BT, use_cache=False, **kw)
    # a transformers model configured with return_dict=False returns a tuple, logits first
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


__all__ = ["DEFAULT_CONTEXT", "context_length", "forward_logits", "is_moelab", "model_device"]
