"""Activation checkpointing (``train.activation_checkpointing``): each decoder block keeps only its input
for backward and runs its forward again there.

    forward:   x_{l+1} = block_l(x_l)            under torch.utils.checkpoint: nothing inside is saved
    backward:  recompute block_l(x_l) (routing replayed), then its backward

Memory: the activations of one block at a time instead of all of them, for about one more forward of
compute (~1/3 more per step). The recomputation is the same function of the same input, so losses and
gradients equal those of a run without checkpointing (tested bit for bit in fp32 on the CPU).

MoE routing runs twice per step: the replay is marked (:func:`moelab.model.moe.replaying`) so the
balancer counts each token's experts once and adds each auxiliary loss once. The blocks keep their
module names (the forward is replaced per instance, no wrapper module), so checkpoints and state dicts
are unchanged.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from moelab.model.moe import replaying


def _contexts():
    """(context of the first forward, context of the recomputation)."""
    return nullcontext(), replaying()


def _checkpointed(forward, *args, **kwargs):
    cache = kwargs.get("cache", args[4] if len(args) > 4 else None)       # DecoderLayer(x, cos, sin, mask, cache)
    if not torch.is_grad_enabled() or cache is not None:                  # evaluation and decoding: as is
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``layers``, final ``norm``) of a causal LM (LoRA / ESFT wrapped or not) or of a
    vision-language model's language model."""
    return getattr(model, "language", model).model


def compile_inside(block: torch.nn.Module, **compile_kwargs) -> bool:
    """If ``block`` is checkpointed, compile its own forward and keep the checkpoint around it eager (dynamo
    cannot trace the checkpoint's recomputation contexts); the recomputation reruns the compiled code.
    Returns whether it was (call after :func:`enable_activation_checkpointing`)."""
    if not getattr(block, "_moelab_checkpointed", False):
        return False
    inner = block.forward.args[0]                         # functools.partial(_checkpointed, forward)
    block.forward = functools.partial(_checkpointed, torch.compile(inner, **compile_kwargs))
    return True


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every decoder block of ``model`` (a :class:`~moelab.model.transformer.DeepSeekForCausalLM`,
    LoRA / ESFT wrapped or not, or a vision-language model's language model) in backward; returns the number
    of blocks. Idempotent."""
    blocks = decoder_stack(model).layers
    for block in blocks:
        if not getattr(block, "_moelab_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward)
            block._moelab_checkpointed = True
    return len(blocks)
