"""Which routed-expert kernel runs: one pure function of (requested kernel, device, dtype, grad mode,
token count, shapes), and the one-time log line when it is not the requested one.

The decision table is :func:`choose_kernel`'s docstring; tests/test_kernel_choice.py holds it as rows.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

# the kernels' logger: substitutions are reported where the kernels live
log = logging.getLogger("moelab.model.experts")


#: The kernels ``expert_impl`` may request; :func:`choose_kernel` may also pick ``"few_tokens"``.
KERNELS = ("loop", "grouped_mm", "padded_bmm", "fused")


class KernelChoice(NamedTuple):
    """The kernel that runs, and why it is not the requested one (None when it is)."""

    kernel: str            # "loop" | "grouped_mm" | "padded_bmm" | "fused" | "few_tokens"
    reason: str | None


def choose_kernel(requested: str, *, device_type: str, dtype: torch.dtype, grad_enabled: bool, n_tokens: int,
                  n_routed: int, n_experts: int, hidden: int, inner: int,
                  grouped_mm_missing: str | None) -> KernelChoice:
    """Which kernel computes the routed experts of one forward (a pure function of its arguments):
    requested ``expert_impl``; device type and the dtype the experts compute in (the autocast dtype
    under autocast, else that of the input x ``[N, H]``); n_tokens N; n_routed ``N·K``; hidden H; inner I
    (the expert width); grouped_mm_missing: why this torch's ``grouped_mm`` cannot run on the device at all
    (absent, or without a kernel there: torch 2.8–2.10 have none for the CPU), None when it can.

    * Without autograd and with fewer routed rows than experts (``N·K < E``, a decode step), every
      request runs ``few_tokens``: a gather of the chosen experts' weights beats visiting all E.
    * ``loop`` and ``padded_bmm`` always run as asked.
    * ``grouped_mm`` and ``fused`` need operands ``grouped_mm`` takes (:func:`_grouped_mm_refusal`);
      else ``grouped_mm`` runs the loop, and ``fused`` the padded bmm on CUDA, the loop elsewhere.
    """
    if requested not in KERNELS:
        raise ValueError(f"unknown expert kernel {requested!r}; choose one of {', '.join(KERNELS)}")
    if n_routed < n_experts and not grad_enabled:
        return KernelChoice("few_tokens", "decoding: fewer routed rows than experts, no autograd")
    if requested in ("loop", "padded_bmm"):
        return KernelChoice(requested, None)
    # fused hands x [N, H] to grouped_mm, grouped_mm the slots [S, H] (S > 0 exactly when N·K > 0)
    rows = n_tokens if requested == "fused" else n_routed
    refusal = _grouped_mm_refusal(device_type, dtype, rows, hidden, inner, grouped_mm_missing)
    if refusal is None:
        return KernelChoice(requested, None)
    if requested == "fused" and device_type == "cuda":
        return KernelChoice("padded_bmm", refusal)
    return KernelChoice("loop", refusal)


def _grouped_mm_refusal(device_type: str, dtype: torch.dtype, rows: int, hidden: int, inner: int,
                        missing: str | None) -> str | None:
    """Why ``grouped_mm`` would not take operands ``[rows, hidden]`` (and width ``inner``) of ``dtype``,
    or None if it would: row strides must be multiples of 16 bytes, and on CUDA only bf16 is supported."""
    if missing is not None:
        return missing
    if device_type == "cuda" and dtype != torch.bfloat16:
        return f"grouped_mm takes only bfloat16 on CUDA, not {str(dtype).removeprefix('torch.')}"
    if rows <= 0:
        return "no routed rows"
    size = dtype.itemsize
    if (hidden * size) % 16 or (inner * size) % 16:
        return f"grouped_mm needs 16-byte row strides (hidden {hidden}, width {inner}, {size}-byte elements)"
    return None


_logged: set[tuple[str, str, str | None]] = set()     # (requested, run, reason) reported already


def log_choice(requested: str, choice: KernelChoice) -> None:
    """Report a substitution once, not at every forward."""
    key = (requested, *choice)
    if key in _logged:
        return
    level = logging.DEBUG if choice.kernel == "few_tokens" else logging.INFO
    if not log.isEnabledFor(level):     # not marked as logged: it is reported once logging is on
        return
    _logged.add(key)
    log.log(level, "expert_impl %r runs as %r: %s", requested, choice.kernel, choice.reason)
