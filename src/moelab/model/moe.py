"""The DeepSeekMoE layer: fine-grained routed experts plus always-on shared experts (docs/methods.md §1).

    h_t = Σ_shared FFN_i(u_t) + Σ_routed g_{i,t} · FFN_i(u_t)      (the residual is added by the block)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moelab.config import ModelConfig
from moelab.model.experts import RoutedExperts
from moelab.model.mlp import SwiGLU
from moelab.model.router import Router, Routing

_replay = threading.local()


@contextmanager
def replaying() -> Iterator[None]:
    """Marks forwards run again to recompute activations (activation checkpointing): their routing reaches
    the observers with ``routing.replay = True``, so loads are not counted twice; an observer that builds a
    differentiable loss builds it again (the recomputation must save the same tensors) and drops it."""
    before = getattr(_replay, "on", False)
    _replay.on = True
    try:
        yield
    finally:
        _replay.on = before


class DeepSeekMoE(nn.Module):
    """forward(x ``[B, T, H]``) -> ``[B, T, H]``.

    ``routing_observers`` are called as ``fn(module, routing)`` after every routing decision; the
    training stage uses them to count expert loads (balancing, MaxVio) without touching this file.
    Inside :func:`replaying` the routing they see has ``replay = True``.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = SwiGLU(cfg.hidden_size, n_shared * cfg.moe_intermediate_size) if n_shared else None
        self.routing_observers: list[Callable[[DeepSeekMoE, Routing], None]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_NH = x.reshape(-1, shape[-1])
        routing = self.gate(x_NH)
        routing.batch_shape = tuple(shape[:-1])
        routing.replay = getattr(_replay, "on", False)
        for fn in self.routing_observers:
            fn(self, routing)
        y = self.experts(x_NH, routing.indices, routing.weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_NH)
        return y.view(shape)
