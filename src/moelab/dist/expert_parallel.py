"""Expert parallelism: each of the ``ep`` ranks of a group holds E/ep routed experts, and tokens travel to
their experts and back with two uneven all-to-alls around ``compute`` (docs/methods.md §1's seam).

Legend: N tokens on this rank, K experts per token, E routed experts, El = E/ep local experts, H hidden,
M = N·K routed rows sent, R rows received (from all ep ranks, for this rank's El experts).

    plan   = permute(indices, gates, E)           # [M] slots sorted by global expert: rank r's run is contiguous
    x_MH   = dispatch(x_NH, plan)                 # gates stay here: only token rows travel
    x_RH   = all_to_all(x_MH, send, recv)         # rows for experts [r·El, (r+1)·El) arrive, by source rank
    y_RH   = experts(x_RH regrouped by local expert)  → back in arrival order
    y_MH   = all_to_all(y_RH, recv, send)         # the reverse exchange
    y_NH   = unpermute(y_MH, plan, N)             # gate in fp32 and the K-slot sum, as on one device

The counts are exchanged first (one all-to-all of E integers), so every rank knows how many rows it
sends to and receives from each peer. Backward runs the same two exchanges in reverse
(:class:`AllToAll`). The expert weights of rank r are rows ``[r·El, (r+1)·El)`` of the full stacked
tensors; every rank builds the full model from the same seed and keeps its slice
(:func:`shard_model_experts`), so a run on one process and on ep processes start from the same weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moelab.model.experts import (
    RoutedExperts,
    autocast_dtype,
    compute_dtype,
    dispatch,
    grouped_mm_missing,
    permute,
    unpermute,
)
from moelab.model.kernel_choice import choose_kernel
from moelab.model.moe import DeepSeekMoE


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits and its adjoint: forward(x ``[sum(send), H]``, send, recv,
    group) -> ``[sum(recv), H]``; backward exchanges the gradient the other way (recv ↔ send)."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class ExpertParallelExperts(RoutedExperts):
    """This rank's El = E/ep routed experts. forward(x ``[N, H]``, indices / gates ``[N, K]`` over all E
    experts) -> ``[N, H]``, exchanging rows with the other ep ranks (a collective: every rank of the
    group must call it, also with N = 0).

    ``gate_up_proj`` ``[El, 2I, H]``, ``down_proj`` ``[El, H, I]``: rows ``[first, first + El)`` of the full
    tensors. Kernels: ``grouped_mm`` where it takes the operands (``fused`` and ``padded_bmm`` requests
    run it too: they own the whole permute → unpermute and cannot host the exchange), else a loop that
    visits every local expert — also those that received no rows, so every rank's weights get a gradient
    (zeros) and FSDP's reduce-scatter sees the same parameters on every rank."""

    def __init__(self, full: RoutedExperts, ep_rank: int, ep: int, group):
        nn.Module.__init__(self)
        E = full.n_experts
        self.n_experts, self.inner, self.impl, self.compile = E, full.inner, full.impl, full.compile
        self.n_local, self.ep, self.group = E // ep, ep, group
        self.first = ep_rank * self.n_local
        rows = slice(self.first, self.first + self.n_local)
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[rows].clone(),
                                         requires_grad=full.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(full.down_proj.detach()[rows].clone(),
                                      requires_grad=full.down_proj.requires_grad)

    # eager inside compiled blocks (train.compile): the exchange sizes are data (read on the host) and the
    # collectives run as they are; the rest of the block stays compiled around this one graph break
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        N, El, ep = x.shape[0], self.n_local, self.ep
        compute_dt = autocast_dtype(x)
        plan = permute(indices, gates, self.n_experts)
        x_slots = dispatch(x, plan, compute_dt)                                     # [M, H]
        counts = plan.counts                                                        # [E] rows this rank sends
        recv_counts = torch.empty_like(counts)                                      # [ep·El]: from rank s, expert e
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        send = counts.view(ep, El).sum(1).tolist()
        recv_by = recv_counts.view(ep, El)                                          # [source rank, local expert]
        recv = recv_by.sum(1).tolist()
        x_recv = AllToAll.apply(x_slots, send, recv, self.group)                    # [R, H] by source rank
        # regroup by local expert (stable: source rank, then arrival order within an expert)
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep),
                                                recv_by.reshape(-1))
        order = torch.argsort(expert_of_row, stable=True)
        local_counts = recv_by.sum(0)                                               # [El]
        y_grouped = self._compute_local(x_recv.index_select(0, order), local_counts)
        y_recv = torch.empty_like(y_grouped).index_copy(0, order, y_grouped) if y_grouped.shape[0] else y_grouped
        y_slots = AllToAll.apply(y_recv, recv, send, self.group)                    # [M, H]
        if N == 0:
            return x.new_zeros(x.shape) + 0 * y_slots.sum()      # keep the graph (and the exchanges' backward)
        return unpermute(y_slots, plan, N)

    def _compute_local(self, x_rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts over rows grouped by expert ``[R, H]`` (``counts`` ``[El]``) -> ``[R, H]``."""
        dt = compute_dtype(x_rows)
        requested = "grouped_mm" if self.impl != "loop" else "loop"
        choice = choose_kernel(requested, device_type=x_rows.device.type, dtype=dt, grad_enabled=True,
                               n_tokens=x_rows.shape[0], n_routed=x_rows.shape[0], n_experts=self.n_local,
                               hidden=x_rows.shape[1], inner=self.inner,
                               grouped_mm_missing=grouped_mm_missing(x_rows.device, dt))
        if choice.kernel == "grouped_mm":
            return self._grouped(x_rows, counts)
        return self._loop(x_rows, counts, every_expert=True)

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.n_local - 1} of {self.n_experts}, ep={self.ep}"


def shard_model_experts(model: nn.Module, ps) -> list[ExpertParallelExperts]:
    """Replace every MoE layer's routed experts by this rank's share (``ps``: a
    :class:`~moelab.dist.mesh.ParallelState` with ep > 1), in place; returns the new modules."""
    out = []
    for m in model.modules():
        if isinstance(m, DeepSeekMoE) and not isinstance(m.experts, ExpertParallelExperts):
            m.experts = ExpertParallelExperts(m.experts, ps.ep_rank, ps.ep, ps.ep_group)
            out.append(m.experts)
    return out
