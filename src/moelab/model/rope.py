"""Rotary position embeddings with optional YaRN context extension (docs/methods.md §4).

Dimension legend: B batch, T positions, D rotated dims (``rope_dim``), D/2 frequency pairs.

Two layouts rotate the same pairs of a vector and give equal attention scores:

* ``interleave=True`` (DeepSeek checkpoints, the reference code): pairs are (x0,x1),(x2,x3),...
  and the output keeps that layout.
* ``interleave=False`` (Llama style, HF ``rope_interleave=False``): pairs are (x_i, x_{i+D/2}).

The model makes full-width tables once per forward (:meth:`RotaryEmbedding.tables`) and every attention
layer rotates with them in four elementwise ops (:func:`rotate`): ``x·C + swap(x)·S``, where ``swap``
exchanges the two members of each pair and ``S`` carries the sign. That is the reference formula
``(x1·c − x2·s, x2·c + x1·s)`` with the same roundings (bit-identical), in fewer kernels: a decode step is
bound by kernel count, and this was nine per rotation (two of them casts of the same tables).
"""

from __future__ import annotations

import math

import torch

from moelab.config import ModelConfig, RopeScaling
from moelab.model.fp32 import FP32Buffers


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """``theta^(-2i/dim)`` for i in [0, dim/2): ``[D/2]`` fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_correction_range(dim: int, theta: float, orig_len: int, beta_fast: float,
                          beta_slow: float, truncate: bool = True) -> tuple[float, float]:
    """The frequency-index range [low, high] over which YaRN ramps from keep to interpolate (whole
    indices unless ``truncate`` is off)."""

    def corr(n_rot: float) -> float:
        return dim * math.log(orig_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, theta: float, factor: float, orig_len: int, beta_fast: float,
                  beta_slow: float, truncate: bool = True) -> torch.Tensor:
    """YaRN inverse frequencies ``[D/2]``: high frequencies kept, low ones divided by ``factor``."""
    freq = default_inv_freq(dim, theta)
    low, high = yarn_correction_range(dim, theta, orig_len, beta_fast, beta_slow, truncate)
    high_f = high + 0.001 if low == high else float(high)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high_f - low)).clamp(0, 1)
    return freq * (1 - ramp) + (freq / factor) * ramp


def _inv_freq(dim: int, theta: float, yarn: RopeScaling | None) -> torch.Tensor:
    if yarn is None:
        return default_inv_freq(dim, theta)
    return yarn_inv_freq(dim, theta, yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast,
                         yarn.beta_slow, yarn.truncate)


class RotaryEmbedding(FP32Buffers):
    """Computes cos/sin tables for positions.

    forward(positions ``[T]`` or ``[B, T]`` int) -> (cos, sin), each ``[..., T, D/2]`` fp32,
    already multiplied by the YaRN cos/sin factor (:attr:`RopeScaling.cos_sin_factor`).
    """

    _fp32_buffers = ("inv_freq",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, theta = cfg.rope_dim, cfg.rope_theta
        self.attention_scaling = 1.0
        if cfg.yarn_active:
            self.attention_scaling = cfg.rope_scaling.cos_sin_factor
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", _inv_freq(dim, theta, cfg.rope_scaling if cfg.yarn_active else None),
                             persistent=False)
        self._recompute = (dim, theta, cfg.yarn_active, cfg.rope_scaling)
        self.interleave = cfg.rope_interleave

    def reset_parameters(self) -> None:
        """Recompute ``inv_freq`` (after a meta-device build or ``to_empty``)."""
        dim, theta, yarn, rs = self._recompute
        self.inv_freq = _inv_freq(dim, theta, rs if yarn else None).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., T, D/2]
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation tables of :func:`rotate` for ``positions`` ``[1, T]`` or ``[B, T]``: (C, S), each
        ``[B|1, T, D]`` in ``dtype`` (that of the rotated activations: the autocast dtype under autocast)."""
        return rope_tables(*self(positions), self.interleave, dtype)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Half tables ``cos``/``sin`` ``[..., D/2]`` (fp32) -> full tables (C, S) ``[..., D]`` in ``dtype``:
    C holds each pair's cosine at both members, S its sine with the first member's sign flipped."""
    cos, sin = cos.to(dtype), sin.to(dtype)                 # rounded as the reference rounds them, then spread
    if interleave:
        return torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


def rotate(x: torch.Tensor, C: torch.Tensor, S: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dimension of ``x`` ``[B, T, ..., D]`` by tables ``C``/``S`` ``[B|1, T, D]``
    (:func:`rope_tables`), broadcast over every axis between T and D (heads): ``x·C + swap(x)·S``."""
    shape = (*C.shape[:2], *([1] * (x.dim() - C.dim())), C.shape[-1])
    C, S = C.reshape(shape).to(x.dtype), S.reshape(shape).to(x.dtype)     # no-ops when made for x's dtype
    if interleave:
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)             # (x1, x0, x3, x2, ...)
    else:
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * C + swapped * S


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dimension of ``x`` ``[B, T, ..., D]`` by half tables ``cos/sin`` ``[B|1, T, D/2]``
    (:meth:`RotaryEmbedding.forward`), broadcast over every axis between T and D (heads): the one-off
    form of :func:`rope_tables` + :func:`rotate`."""
    return rotate(x, *rope_tables(cos, sin, interleave, x.dtype), interleave)
