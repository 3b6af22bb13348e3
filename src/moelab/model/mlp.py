"""The bias-free SwiGLU feed-forward used by dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: x ``[..., H]`` -> ``[..., H]`` through width ``I``.

    All shared experts of a DeepSeekMoE layer form ONE SwiGLU of width ``n_shared * I``
    (state-dict prefix ``mlp.shared_experts``), which equals the sum of the split experts.
    """

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
