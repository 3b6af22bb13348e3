"""Routed experts behind one small interface: permute -> expert compute -> unpermute.

Legend: N tokens, H hidden, I expert width, E experts, K experts per token, M = N·K routed rows,
S slots (S = M packed, or S = E·C with a capacity C per expert when padded).

    plan  = permute(indices, gates, E)     # which token fills each slot, its gate, rows per expert
    x_SH  = dispatch(x_NH, plan)           # gather the tokens into slots, grouped by expert
    y_SH  = compute(x_SH, plan, kernel)    # any kernel: per-expert loop, grouped GEMM, padded bmm, ...
    y_NH  = unpermute(y_SH, plan, N)       # gate in fp32, each token's K slots gathered and summed

Expert parallelism puts an all-to-all around ``compute`` (gates never leave the token's rank); a faster
kernel replaces ``compute``; neither touches the router or the block. Weights live stacked for speed —
``gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and ``down_proj`` ``[E, H, I]`` — and are split into the
per-expert Hugging Face tensors ``mlp.experts.{e}.{gate,up,down}_proj.weight`` at the checkpoint boundary.

Kernels (``expert_impl``):

* ``loop`` — one pair of GEMMs per expert over its packed rows: the reference.
* ``grouped_mm`` — ``torch.nn.functional.grouped_mm`` over the packed rows (one call per projection).
* ``padded_bmm`` — slots padded to the busiest expert's count C, two ``torch.bmm`` calls over
  ``[E, C, ·]``; padding slots read a zero row and are dropped on the way back. Wastes ``E·C − M`` rows.
* ``fused`` — dispatch, both grouped GEMMs, the gate and the combine in one autograd function
  (:class:`FusedGroupedExperts`) that keeps only the gate/up pre-activations for backward and
  recomputes the rest: the fastest and leanest on one device. It owns the whole permute → compute →
  unpermute sequence, so expert parallelism uses the modular kernels above.

No kernel adds with atomics: ``permute`` keeps the inverse of its stable sort (the slot of each
(token, k) pair), so the way back — the combine, and dispatch's gradient — gathers each token's K slots
and sums them (:func:`~moelab.model.expert_ops.sum_slots`): the routing traffic is bitwise reproducible
on the GPU too, forward and backward (the GEMMs are as reproducible as their libraries). Tensor helpers
(slot sums, the fp32 gate without fp32 copies, the SwiGLU activations, :class:`PaddedSwiGLU`) live in
:mod:`moelab.model.expert_ops`.

:func:`choose_kernel` picks the kernel that runs, once per forward: decode steps take ``few_tokens``,
and a grouped kernel whose operands ``grouped_mm`` refuses gives way to the loop or the padded bmm.
Each substitution is logged once (INFO; DEBUG for ``few_tokens``) on the ``moelab.model.experts`` logger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.model.expert_ops import PaddedSwiGLU, elementwise, expert_counts, gated, gather_rows, rowdot, sum_slots
from moelab.model.kernel_choice import KERNELS, KernelChoice, choose_kernel, log_choice  # noqa: F401 (re-exported)


@dataclass
class Plan:
    """Where each routed (token, expert) pair goes."""

    token: torch.Tensor        # [S] int64 source token of each slot (padding: N, or 0 when aligned)
    gate: torch.Tensor         # [S] fp32 gate of each slot (0 for padding)
    counts: torch.Tensor       # [E] int64 routed rows per expert
    capacity: int | None       # C when slots are padded to [E, C], None otherwise
    inverse: torch.Tensor      # [N, K] int64 slot of each (token, k) pair: token's inverse, padding never named
    segments: torch.Tensor | None = None  # [E] slots per expert when padded (C each) or aligned

    @property
    def rows(self) -> torch.Tensor:
        """Slots per expert ``[E]`` — the group sizes a grouped kernel sees."""
        return self.counts if self.segments is None else self.segments


# torch.nn.functional.grouped_mm (recent torch), else the private op it wraps (torch._grouped_mm); older
# torch has neither, and the grouped kernels then fall back to the loop / padded bmm (choose_kernel).
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_probed: dict[tuple[str, int | None, torch.dtype], str | None] = {}


@torch.compiler.assume_constant_result
def grouped_mm_missing(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this torch's ``grouped_mm`` cannot run on ``device`` (None when it can): absent, or without a
    kernel there (torch 2.8–2.10 have the op for CUDA only; older GPUs may lack one). Probed once per device
    and dtype (bf16 on CUDA, the only dtype it takes there) with a two-group product; compiled code sees
    the answer as a constant, and a probe wanted while a CUDA graph is being captured is put off."""
    if grouped_mm is None:
        return "this torch has no grouped_mm"
    dtype = torch.bfloat16 if device.type == "cuda" else dtype
    key = (device.type, device.index, dtype)
    if key not in _probed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        try:
            a = torch.zeros(32, 16, dtype=dtype, device=device)
            b = torch.zeros(2, 16, 16, dtype=dtype, device=device)
            grouped_mm(a, b.transpose(1, 2), offs=torch.tensor([16, 32], dtype=torch.int32, device=device))
            _probed[key] = None
        except (NotImplementedError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            _probed[key] = f"this torch's grouped_mm does not run on {device.type} in {str(dtype)[6:]} ({first})"
    return _probed[key]

# Row alignment of each expert's group for bf16/fp16 grouped GEMMs on the CPU. oneDNN builds (JIT) a
# kernel per GEMM shape; the per-expert row counts change every step, so unaligned groups keep
# building new kernels (measured: 2.09 vs 1.22 ms per tiny-config grouped GEMM) and, over a run,
# overflow its primitive cache. Rounding groups up to 16 rows bounds the shapes; padding slots read
# token 0 with gate 0, so they add exactly zero (and get zero gradient). fp32 (MKL) needs none.
LOWP_CPU_ALIGN = 16


def permute(indices: torch.Tensor, gates: torch.Tensor, n_experts: int, padded: bool = False,
            align: int = 1) -> Plan:
    """Group the N·K routed pairs by expert (stable, so the order is deterministic).

    indices, gates ``[N, K]`` -> :class:`Plan` with packed slots (``S = N·K``); if ``padded``,
    ``S = E·C`` slots with ``C = max(counts)``; if ``align > 1``, each expert's group rounded up to a
    multiple of ``align`` slots. The plan's ``inverse`` is the stable sort's inverse permutation, shifted
    like the slots (pair ``order[j]`` sits in slot j packed, in ``slot[j]`` padded or aligned): a scatter
    of unique indices, no second sort.
    """
    N, K = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)                                    # [M]
    counts = expert_counts(flat, n_experts)
    token, gate = order // K, gates.reshape(-1)[order].to(torch.float32)
    slot = torch.arange(flat.numel(), device=flat.device)                       # [M] slot of sorted pair j
    if not padded and align <= 1:
        return Plan(token, gate, counts, None, _inverse(order, slot, N, K))
    if padded:
        C = int(counts.max())
        seg = torch.full_like(counts, C)
    else:
        C, seg = None, (counts + align - 1) // align * align
    expert = flat[order]                                                        # [M] sorted expert ids
    slot = (torch.cumsum(seg, 0) - seg)[expert] + slot - (torch.cumsum(counts, 0) - counts)[expert]
    S = int(seg.sum())
    pad_token = N if padded else 0
    token_s = torch.full((S,), pad_token, dtype=torch.long, device=flat.device).index_copy_(0, slot, token)
    gate_s = torch.zeros(S, dtype=torch.float32, device=flat.device).index_copy_(0, slot, gate)
    return Plan(token_s, gate_s, counts, C, _inverse(order, slot, N, K), seg)


def _inverse(order: torch.Tensor, slot: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """``inverse[order[j]] = slot[j]``, as ``[N, K]``: the slot of each (token, k) pair."""
    return torch.empty_like(order).scatter_(0, order, slot).view(N, K)


def dispatch(x: torch.Tensor, plan: Plan, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gather tokens ``[N, H]`` into slots ``[S, H]`` (padding slots read a zero row, or token 0 when
    aligned), cast to ``dtype`` first if given (the N tokens once, not their S slots). Its gradient sums
    each token's K slot gradients (:func:`sum_slots`, no atomics) into x's own dtype."""
    return _Dispatch.apply(x, plan.token, plan.inverse, plan.capacity is not None, dtype)


def unpermute(y: torch.Tensor, plan: Plan, n_tokens: int) -> torch.Tensor:
    """Weight each slot's output ``y`` ``[S, H]`` by its gate (product in fp32, rounded once to y's dtype)
    and sum each token's K slots back into ``[N, H]`` (:func:`sum_slots`: a gather, no atomics; padding
    slots are never read). ``n_tokens`` is N, the rows of ``plan.inverse``."""
    if plan.inverse.shape[0] != n_tokens:
        raise ValueError(f"the plan routes {plan.inverse.shape[0]} tokens, not {n_tokens}")
    return _GatedCombine.apply(y, plan.gate, plan.token, plan.inverse, plan.capacity is not None)


class _Dispatch(torch.autograd.Function):
    """:func:`dispatch`: forward ``x[token]``; backward the adjoint, each token's K slot gradients summed
    (:func:`sum_slots`) where autograd's ``index_select`` backward would ``index_add_`` them — summed into
    x's dtype (fp32 under autocast) straight from the compute-dtype slots where sum_slots can."""

    @staticmethod
    def forward(ctx, x, token, inverse, padded, dtype):
        ctx.save_for_backward(inverse)
        ctx.x_dtype = x.dtype
        return gather_rows(x if dtype is None else x.to(dtype), token, padded)

    @staticmethod
    def backward(ctx, d_slots):
        (inverse,) = ctx.saved_tensors
        return sum_slots(d_slots, inverse, dtype=ctx.x_dtype), None, None, None, None


class _GatedCombine(torch.autograd.Function):
    """:func:`unpermute`: forward ``Σ_k gate·y`` over each token's slots, backward its adjoint — a gather
    by token (as dispatch), scaled by the gate — and the gate's gradient as an fp32 row dot. One node
    that saves y in its own dtype, where autograd of ``(y.float() * gate).to(dt)`` kept an fp32 copy."""

    @staticmethod
    def forward(ctx, y, gate, token, inverse, padded):
        ctx.save_for_backward(y, gate, token)
        ctx.padded = padded
        return sum_slots(gated(y, gate), inverse)

    @staticmethod
    def backward(ctx, d_out):
        y, gate, token = ctx.saved_tensors
        d_w = gather_rows(d_out.to(y.dtype), token, ctx.padded)                  # [S, H]
        d_gate = rowdot(d_w, y) if ctx.needs_input_grad[1] else None
        d_y = gated(d_w, gate, inplace=True) if ctx.needs_input_grad[0] else None
        return d_y, d_gate, None, None, None


class RoutedExperts(nn.Module):
    """E bias-free SwiGLU experts. forward(x ``[N, H]``, indices ``[N, K]``, gates ``[N, K]``) -> ``[N, H]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.inner = E, I
        self.impl = cfg.expert_impl
        self.compile = cfg.compile_experts
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x ``[N, H]``, indices / gates ``[N, K]`` -> ``[N, H]``, by the kernel :func:`choose_kernel` picks.

        Under autocast every kernel computes in the autocast dtype (as ``nn.Linear`` would), whatever the
        stored dtype of x and the weights (fp32 master weights): the kernel is chosen for that dtype."""
        if x.shape[0] == 0:                     # no tokens (an empty batch): nothing to route
            return x.new_zeros(x.shape)
        autocast_dt = autocast_dtype(x)
        dt = autocast_dt or x.dtype
        choice = choose_kernel(self.impl, device_type=x.device.type, dtype=dt,
                               grad_enabled=torch.is_grad_enabled(), n_tokens=x.shape[0], n_routed=indices.numel(),
                               n_experts=self.n_experts, hidden=x.shape[1], inner=self.inner,
                               grouped_mm_missing=grouped_mm_missing(x.device, dt))
        if choice.reason is not None:
            log_choice(self.impl, choice)
        if choice.kernel in ("fused", "grouped_mm") and dt != torch.bfloat16 and torch.compiler.is_compiling():
            # grouped_mm's compile-time (fake tensor) rule takes only bf16, though the CPU kernel runs fp32
            # and fp16 too: the experts run eagerly between two compiled graphs (one graph break)
            return self._eager_run(x, indices, gates, choice.kernel, dt, autocast_dt)
        return self._run(x, indices, gates, choice.kernel, dt, autocast_dt)

    def _run(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, kernel: str, dt: torch.dtype,
             autocast_dt: torch.dtype | None) -> torch.Tensor:
        """The routed experts by ``kernel`` (chosen by :meth:`forward`); dt: the dtype they compute in."""
        if kernel == "few_tokens":
            return self._few_tokens(x, indices, gates)
        # Aligned groups serve the grouped GEMMs (LOWP_CPU_ALIGN). A grouped_mm request keeps them when
        # the loop runs instead, over the same slots (padding slots add exactly zero).
        align = LOWP_CPU_ALIGN if x.device.type == "cpu" and dt in (torch.bfloat16, torch.float16) else 1
        if kernel == "fused":
            plan = permute(indices, gates, self.n_experts, align=align)
            offs = torch.cumsum(plan.rows, 0, dtype=torch.int32)
            return FusedGroupedExperts.apply(x, plan.token, plan.inverse, plan.gate, offs, self.gate_up_proj,
                                             self.down_proj, self.compile, autocast_dt)
        plan = permute(indices, gates, self.n_experts, padded=kernel == "padded_bmm",
                       align=align if self.impl == "grouped_mm" else 1)
        # under autocast: cast the N tokens once, not their N·K slots (the kernels would)
        y = self.compute(dispatch(x, plan, autocast_dt), plan, kernel)
        return unpermute(y, plan, x.shape[0])

    @torch.compiler.disable
    def _eager_run(self, *args) -> torch.Tensor:
        """:meth:`_run` outside any compiled graph."""
        return self._run(*args)

    def compute(self, x_slots: torch.Tensor, plan: Plan, kernel: str) -> torch.Tensor:
        """Apply each expert to its slots ``[S, H]`` -> ``[S, H]`` with a modular kernel: ``padded_bmm``
        (``plan`` padded to a capacity), ``grouped_mm`` or ``loop``."""
        if kernel == "padded_bmm":
            return self._padded(x_slots, plan.capacity)
        if kernel == "grouped_mm":
            return self._grouped(x_slots, plan.rows)
        return self._loop(x_slots, plan.rows)

    def _few_tokens(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Decoding a few tokens (N·K < E, no autograd): gather the N·K chosen experts' weights and run
        two batched GEMVs — a handful of ops, no host sync, where the grouped kernels would visit all E
        experts and the loop would issue 2 GEMMs per expert. Per-slot outputs are gated in fp32 and summed
        over k, as :func:`unpermute` does. x ``[N, H]``, indices/gates ``[N, K]`` -> ``[N, H]``."""
        N, K = indices.shape
        flat = indices.reshape(-1)
        x_s = x[:, None, :].expand(N, K, x.shape[1]).reshape(N * K, 1, x.shape[1])         # [NK, 1, H]
        h = torch.bmm(x_s, self.gate_up_proj.index_select(0, flat).transpose(1, 2))           # [NK, 1, 2I]
        a = F.silu(h[..., :self.inner]) * h[..., self.inner:]
        y = torch.bmm(a, self.down_proj.index_select(0, flat).transpose(1, 2))                # [NK, 1, H]
        y, g = y.view(N, K, -1), gates.to(torch.float32)[..., None]
        if torch.compiler.is_compiling():                   # inductor fuses the plain expression
            return (y.to(torch.float32) * g).to(x.dtype).sum(dim=1)
        # gated in fp32 and rounded once to x's dtype (fp32 under autocast with fp32 activations): one
        # mixed-dtype multiply instead of cast -> multiply -> cast, bitwise the same
        return torch.mul(y, g, out=torch.empty(y.shape, dtype=x.dtype, device=y.device)).sum(dim=1)

    def _loop(self, x_sorted: torch.Tensor, counts: torch.Tensor, every_expert: bool = False) -> torch.Tensor:
        """The reference kernel. ``every_expert``: also visit experts with no rows, so every weight is in the
        graph (a zero gradient rather than none: expert parallelism needs the same gradients on every rank)."""
        outs = []
        for e, x_e in enumerate(torch.split(x_sorted, counts.tolist())):
            if x_e.shape[0] == 0 and not every_expert:
                continue
            gate, up = F.linear(x_e, self.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        return torch.cat(outs) if outs else x_sorted.new_zeros(x_sorted.shape)

    def _grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        dt = compute_dtype(x_sorted)                         # grouped_mm is not covered by autocast
        h = grouped_mm(x_sorted.to(dt), self.gate_up_proj.to(dt).transpose(1, 2), offs=offs)     # [M, 2I]
        gate, up = h.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.to(dt).transpose(1, 2), offs=offs)

    def _padded(self, x_slots: torch.Tensor, C: int) -> torch.Tensor:
        E, H = self.n_experts, x_slots.shape[1]
        w_gu, w_down = self.gate_up_proj, self.down_proj
        dt = autocast_dtype(x_slots)
        if dt is not None:
            # PaddedSwiGLU's backward runs outside autocast: hand it operands of one dtype (the casts
            # carry the gradients back to fp32 master weights) and keep autocast out of its forward
            x_slots, w_gu, w_down = x_slots.to(dt), w_gu.to(dt), w_down.to(dt)
        with torch.autocast(x_slots.device.type, enabled=False):
            y = PaddedSwiGLU.apply(x_slots.view(E, C, H), w_gu, w_down)
        return y.view(E * C, H)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype layers compute in on input ``x``: the autocast dtype under autocast, else x's."""
    return autocast_dtype(x) or x.dtype


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the grouped kernels compute in under autocast (as autocast would for a linear layer:
    ``grouped_mm`` is not on its op lists), or None to keep the inputs'."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class FusedGroupedExperts(torch.autograd.Function):
    """The routed experts of one layer in a single autograd node.

    forward(x ``[N, H]``, token ``[S]`` (slots sorted by expert), inverse ``[N, K]`` (the slot of each
    (token, k) pair), gate ``[S]`` fp32, offs ``[E]`` int32 (cumulative rows per expert), w_gate_up
    ``[E, 2I, H]``, w_down ``[E, H, I]``, compiled: bool, compute_dtype: the autocast dtype or None)
    -> ``[N, H]``::

        x_s = x[token];  h = x_s·W_guᵀ;  a = silu(g)·u·gate;  y_s = a·W_downᵀ;  out[n] = Σ_k y_s[inverse[n, k]]

    * The gate scales the ``[M, I]`` activations (fp32 product, rounded once) instead of the ``[M, H]``
      outputs — the same function, half the traffic — by a mixed-dtype multiply, with no fp32 copy of
      ``[M, I]`` (:func:`~moelab.model.expert_ops.gated`); its gradient likewise (``rowdot``).
    * The combine gathers each token's K slots and sums them (:func:`~moelab.model.expert_ops.sum_slots`),
      and so does the backward's dx: no ``index_add_`` atomics, bitwise deterministic on the GPU. The
      backward's gather of the output gradient into slots stays ``d_out[token]``.
    * Dtypes: x and the weights are cast to ``compute_dtype`` once (under autocast, as it would for
      ``nn.Linear``) and saved cast; every other ``.to`` is a no-op in the common case (d_out arrives in
      the output's dtype); dx is summed straight into x's dtype where the sum can (the gather + sum
      path), the weight gradients are cast back to the masters' dtype.
    * Backward keeps only ``h`` (and x, which the router keeps anyway) and recomputes the gather and the
      activations. With ``compiled`` the elementwise activation math runs through ``torch.compile``
      (``compile_experts`` setting), which keeps the gate product in fp32 inside its fused loop.
    """

    @staticmethod
    def forward(ctx, x, token, inverse, gate, offs, w_gu, w_down, compiled=False, compute_dtype=None):
        ctx.dtypes = (x.dtype, w_gu.dtype, w_down.dtype)
        if compute_dtype is not None:  # under autocast: compute in its dtype, as it would for nn.Linear
            x, w_gu, w_down = x.to(compute_dtype), w_gu.to(compute_dtype), w_down.to(compute_dtype)
        x_s = x.index_select(0, token)                                              # [S, H]
        h = grouped_mm(x_s, w_gu.transpose(1, 2), offs=offs)                        # [S, 2I]
        a_g = elementwise("forward", compiled)(h, gate)                             # [S, I]
        y_s = grouped_mm(a_g, w_down.transpose(1, 2), offs=offs)                    # [S, H]
        ctx.save_for_backward(x, token, inverse, gate, offs, w_gu, w_down, h)
        ctx.compiled = compiled
        return sum_slots(y_s, inverse)                                              # [N, H]

    @staticmethod
    def backward(ctx, d_out):
        x, token, inverse, gate, offs, w_gu, w_down, h = ctx.saved_tensors
        x_dt, gu_dt, down_dt = ctx.dtypes
        dy_s = d_out.to(h.dtype).index_select(0, token)                             # [S, H]
        da_g = grouped_mm(dy_s, w_down, offs=offs)                                  # [S, I]
        dh, d_gate, a_g = elementwise("backward", ctx.compiled)(h, gate, da_g)
        d_down = grouped_mm(dy_s.t(), a_g, offs=offs)                               # [E, H, I]
        x_s = x.index_select(0, token)
        d_gu = grouped_mm(dh.t(), x_s, offs=offs)                                   # [E, 2I, H]
        dx_s = grouped_mm(dh, w_gu, offs=offs)                                      # [S, H]
        dx = sum_slots(dx_s, inverse, dtype=x_dt)                                   # [N, H]
        return dx, None, None, d_gate, None, d_gu.to(gu_dt), d_down.to(down_dt), None, None
