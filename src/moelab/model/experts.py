"""Routed experts behind one small interface: permute -> expert compute -> unpermute.

Legend: N tokens, H hidden, I expert width, E experts, K experts per token, M = N·K routed rows.

    order, counts = permute(indices, E)      # stable sort of the N·K (token, slot) pairs by expert
    x_MH          = x_NH[order // K]         # rows grouped by expert
    y_MH          = compute(x_MH, counts)    # any kernel: a per-expert loop, grouped GEMM, ...
    y_NH          = unpermute(y_MH, order, gates)   # gate in fp32, deterministic index_add

Expert parallelism puts an all-to-all around ``compute``; a faster kernel replaces ``compute``;
neither touches the router or the block. Weights live stacked for speed — ``gate_up_proj``
``[E, 2I, H]`` (gate rows first) and ``down_proj`` ``[E, H, I]`` — and are split into the per-expert
Hugging Face tensors ``mlp.experts.{e}.{gate,up,down}_proj.weight`` at the checkpoint boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig


def permute(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort routed rows by expert. indices ``[N, K]`` -> (order ``[M]`` into the flat ``N·K`` slots,
    counts ``[E]`` rows per expert)."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts


def unpermute(y: torch.Tensor, order: torch.Tensor, gates: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Weight each expert output ``y`` ``[M, H]`` by its gate (fp32) and sum back into ``[N, H]``."""
    K = gates.shape[1]
    weighted = (y.to(torch.float32) * gates.reshape(-1)[order, None]).to(y.dtype)
    out = y.new_zeros(n_tokens, y.shape[1])
    return out.index_add_(0, order // K, weighted)


class RoutedExperts(nn.Module):
    """E bias-free SwiGLU experts. forward(x ``[N, H]``, indices ``[N, K]``, gates ``[N, K]``) -> ``[N, H]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.inner = E, I
        self.impl = cfg.expert_impl
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        order, counts = permute(indices, self.n_experts)
        x_sorted = x[order // indices.shape[1]]                     # [M, H]
        y_sorted = self.compute(x_sorted, counts)                   # [M, H]
        return unpermute(y_sorted, order, gates, x.shape[0])

    def compute(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its ``counts[e]`` consecutive rows of ``x_sorted`` ``[M, H]`` -> ``[M, H]``."""
        if x_sorted.shape[0] == 0 or self.impl == "loop":
            return self._loop(x_sorted, counts)
        if self.impl == "grouped_mm":
            return self._grouped(x_sorted, counts)
        return self._padded(x_sorted, counts)

    def _loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs = []
        for e, x_e in enumerate(torch.split(x_sorted, counts.tolist())):
            if x_e.shape[0] == 0:
                continue
            gate, up = F.linear(x_e, self.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        return torch.cat(outs) if outs else x_sorted.new_zeros(x_sorted.shape)

    def _padded(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Capacity-padded batched GEMMs: rows scattered into ``[E, C, H]`` (C = busiest expert's count,
        zero rows elsewhere), two ``bmm`` calls, rows gathered back. Wastes ``E·C − M`` rows of compute."""
        E, (M, H) = self.n_experts, x_sorted.shape
        C = int(counts.max())
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=counts.device), counts)     # [M]
        starts = torch.cumsum(counts, 0) - counts                                                 # [E]
        dest = expert_of_row * C + torch.arange(M, device=counts.device) - starts[expert_of_row]  # [M]
        x_pad = x_sorted.new_zeros(E * C, H).index_copy(0, dest, x_sorted).view(E, C, H)
        gate, up = torch.bmm(x_pad, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)       # [E, C, I] x2
        y_pad = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))                 # [E, C, H]
        return y_pad.view(E * C, H)[dest]

    def _grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = F.grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offs=offs)   # [M, 2I]
        gate, up = h.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
