"""Tensor building blocks of the routed-expert kernels (:mod:`moelab.model.experts`), free of module state.

Legend as there: N tokens, K experts per token, S slots, M = N·K routed rows, H hidden, I expert width.

* Slot traffic: :func:`gather_rows` (tokens -> slots) and :func:`sum_slots` (slots -> tokens), its adjoint.
  Each token owns exactly K slots, so the sum back is a gather of those K rows and a sum over them —
  every output row is written once, by one reduction in a fixed order: no atomics, bitwise
  reproducible, where ``index_add_`` (the old combine) adds with atomics on CUDA in whatever order the
  threads arrive.
* Routed rows per expert: :func:`expert_counts` (``bincount`` without its host sync on CUDA).
* The fp32 gate: :func:`gated` (``a·gate`` row-wise) and :func:`rowdot` (its gradient), without fp32
  copies of the ``[M, ·]`` activations.
* The gated SwiGLU activation of the fused kernel (:func:`act_forward`, :func:`act_backward`, eager or
  ``torch.compile``d through :func:`elementwise`) and the padded-bmm SwiGLU (:class:`PaddedSwiGLU`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Devices whose :func:`sum_slots` runs as ``index_select`` + ``sum`` over K; every other device runs
#: ``embedding_bag`` (one pass). On this repository's 2-core CPU (4,096 tokens, K = 6, H 256 / 1024, fp32 and
#: bf16) it beat index_add_ in every case (bf16 H 1024: 2.4 vs 12.4 ms; fp32: 12.7 vs 15.0 ms), and gather
#: + sum lost to both (the [M, H] intermediate: 26 ms). On CUDA gather + sum are two vectorised
#: memory-bound kernels (3× the traffic of one pass, no atomics), while embedding_bag's kernel loads one
#: scalar per thread per slot: CUDA keeps the former until a GPU measurement says otherwise.
GATHER_SUM_DEVICES = ("cuda",)


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Routed rows per expert ``[E]`` int64 for expert ids ``[...]`` in ``[0, E)``: ``bincount`` with
    ``minlength=E``, as an integer ``scatter_add_`` — on CUDA ``bincount`` reads the ids' max back to the
    host (a sync per MoE layer, and no CUDA graph around a step); integer sums are exact in any order."""
    flat = indices.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))


def gather_rows(x: torch.Tensor, token: torch.Tensor, padded: bool = False) -> torch.Tensor:
    """Rows of x ``[N, H]`` into slots ``[S, H]``: ``x[token]``; ``padded``: token N reads a zero row."""
    if padded:
        x = torch.cat((x, x.new_zeros(1, x.shape[1])))
    return x.index_select(0, token)


def sum_slots(y: torch.Tensor, inverse: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each token's K slots summed: ``out[n] = Σ_k y[inverse[n, k]]`` for y ``[S, H]``, inverse ``[N, K]``
    (the slot of each (token, k) pair; slots no pair names — padding — are never read) -> ``[N, H]``.

    bf16/fp16 rows are accumulated in fp32 and rounded once (the old ``index_add_`` rounded after every
    addition). ``dtype``: the result's (default y's); on the gather + sum path the reduction writes it
    directly (e.g. an fp32 gradient from bf16 slots, no extra rounding). Deterministic on every device;
    which of the two implementations runs: :data:`GATHER_SUM_DEVICES`."""
    N, K = inverse.shape
    if y.device.type in GATHER_SUM_DEVICES:
        return y.index_select(0, inverse.reshape(-1)).view(N, K, y.shape[1]).sum(1, dtype=dtype)
    out = F.embedding_bag(inverse, y, mode="sum")
    return out if dtype is None else out.to(dtype)


def gated(a: torch.Tensor, gate: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``a · gate`` row-wise (a ``[M, X]``, gate ``[M]`` fp32), the product computed in fp32 and rounded once
    to a's dtype (no autograd: callers are autograd functions).

    Eager: one mixed-dtype multiply writing a's dtype — on CUDA one kernel that upcasts, multiplies and
    rounds, instead of the cast -> multiply -> cast round trip through an fp32 ``[M, X]`` copy (the CPU
    makes fp32 temporaries behind the scenes: the same cost as before, bitwise the same result).
    ``inplace`` overwrites a, a scratch tensor the caller owns. Compiled: the plain fp32 expression,
    which inductor fuses into its loop."""
    if torch.compiler.is_compiling():
        return (a.to(torch.float32) * gate[:, None]).to(a.dtype)
    return torch.mul(a, gate[:, None], out=a if inplace else torch.empty_like(a))


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_i a[m, i]·b[m, i]`` ``[M]`` in fp32 (the gate's gradient). bf16/fp16 operands: each product is
    exact in fp32 and the sum fp32; eager, one ``addcmul`` against an fp32 zero promotes in the kernel
    instead of two fp32 copies of the operands (bitwise the old ``(a.float() * b.float()).sum(1)``)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return (a * b).sum(1)
    if torch.compiler.is_compiling():
        return (a.to(torch.float32) * b.to(torch.float32)).sum(1)
    return torch.addcmul(a.new_zeros(1, 1, dtype=torch.float32), a, b).sum(1)


def act_forward(h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated SwiGLU activation: h ``[M, 2I]`` = [g | u], gate ``[M]`` fp32 -> ``silu(g)·u·gate`` ``[M, I]``
    (the gate product in fp32, rounded once; three passes, all in h's dtype)."""
    I = h.shape[1] // 2
    return gated(F.silu(h[:, :I]).mul_(h[:, I:]), gate, inplace=True)


def act_backward(h: torch.Tensor, gate: torch.Tensor, da_g: torch.Tensor):
    """Gradients of :func:`act_forward`: returns (dh ``[M, 2I]``, d_gate ``[M]`` fp32, the activation
    ``[M, I]`` recomputed for the down-projection's weight gradient). Few full passes over ``[M, I]``
    (they are memory-bound): ``silu_backward`` gives d/dg in one, both halves are written in place, and
    no pass makes an fp32 copy. ``da_g`` (the down-projection's input gradient) is overwritten in eager
    mode."""
    I = h.shape[1] // 2
    g, u = h[:, :I], h[:, I:]
    silu = F.silu(g)
    a = silu * u
    d_gate = rowdot(da_g, a)
    da = gated(da_g, gate, inplace=True)
    if torch.compiler.is_compiling():   # dynamo cannot write out= into column halves: one cat, fused by inductor
        dh = torch.cat((torch.ops.aten.silu_backward(da * u, g), da * silu), dim=1)
    else:
        dh = torch.empty_like(h)
        torch.ops.aten.silu_backward.grad_input(da * u, g, grad_input=dh[:, :I])   # d silu(g)/dg
        torch.mul(da, silu, out=dh[:, I:])
    return dh, d_gate, gated(a, gate, inplace=True)


_compiled: dict[str, object] = {}


def elementwise(name: str, compiled: bool):
    """The eager activation function, or its ``torch.compile`` version (fused into one loop per pass)."""
    fn = {"forward": act_forward, "backward": act_backward}[name]
    if not compiled:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=None)
    return _compiled[name]


class PaddedSwiGLU(torch.autograd.Function):
    """E SwiGLU experts over padded slots with a hand-written backward.

    forward(x ``[E, C, H]``, w_gate_up ``[E, 2I, H]``, w_down ``[E, H, I]``) -> ``[E, C, H]``.
    Saves only x and the gate/up pre-activations h ``[E, C, 2I]`` (autograd would also keep silu(g),
    u and their product) and writes the gradient of h into one buffer (no chunk/cat round trip).
    """

    @staticmethod
    def forward(ctx, x, w_gu, w_down):
        h = torch.bmm(x, w_gu.transpose(1, 2))                                   # [E, C, 2I]
        g, u = h.chunk(2, dim=-1)
        y = torch.bmm(F.silu(g) * u, w_down.transpose(1, 2))                     # [E, C, H]
        ctx.save_for_backward(x, h, w_gu, w_down)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, w_gu, w_down = ctx.saved_tensors
        I = h.shape[-1] // 2
        g, u = h[..., :I], h[..., I:]
        sig = torch.sigmoid(g)
        silu = g * sig
        dy = dy.contiguous()
        da = torch.bmm(dy, w_down)                                                # [E, C, I]
        d_down = torch.bmm(dy.transpose(1, 2), silu * u)                          # [E, H, I]
        dh = torch.empty_like(h)
        torch.mul(da * u, sig * (1 + g * (1 - sig)), out=dh[..., :I])             # d silu(g) / dg
        torch.mul(da, silu, out=dh[..., I:])
        d_gu = torch.bmm(dh.transpose(1, 2), x)                                   # [E, 2I, H]
        dx = torch.bmm(dh, w_gu)                                                  # [E, C, H]
        return dx, d_gu, d_down
