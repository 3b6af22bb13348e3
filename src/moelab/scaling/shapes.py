"""Concrete model shapes for a scale M (DeepSeek LLM §3; docs/methods.md §10), and :func:`suggest`.

:func:`nearest_shape` turns an M (non-embedding FLOPs per token, :mod:`moelab.scaling.laws`) into a
concrete (L, d) by solving ``72·L·d² + 12·L·d·l_seq = M`` for d at every L, rounding d to a multiple,
and preferring, among shapes within ``rel_tol`` of M, the one whose ``d/L`` is closest to ``aspect``
(a moelab choice; DeepSeek's models have d/L between 64 and 137). :func:`suggest` puts the laws and a
shape together for one budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moelab.errors import ConfigError
from moelab.scaling.laws import (
    PAPER_SEQ_LEN,
    PAPER_VOCAB,
    Allocation,
    HyperParams,
    non_embedding_flops,
    optimal_allocation,
    optimal_hyperparams,
    six_n1,
    six_n2,
)


def default_heads(d: int) -> tuple[int, int]:
    """``(n_heads, head_dim)`` for width d: head size 128 from d = 1024 (as DeepSeek LLM), 64 from 256,
    32 from 64, else 16 — or the largest even size below that which divides d."""
    if d <= 0 or d % 2:
        raise ConfigError(f"the model width must be a positive even number (got {d})")
    preferred = 128 if d >= 1024 else 64 if d >= 256 else 32 if d >= 64 else 16
    head_dim = next(h for h in (128, 64, 32, 16, 8, 4, 2) if h <= preferred and d % h == 0)
    return d // head_dim, head_dim


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d: int
    n_heads: int
    head_dim: int
    M: float
    target_M: float

    @property
    def rel_err(self) -> float:
        return self.M / self.target_M - 1.0

    @property
    def aspect(self) -> float:
        return self.d / self.n_layer

    def as_dict(self) -> dict:
        return {**asdict(self), "rel_err": self.rel_err, "aspect": self.aspect}


def width_for(M: float, n_layer: int, seq_len: int) -> float:
    """The (real) d with ``72·L·d² + 12·L·d·l_seq = M``: the positive root of the quadratic."""
    a, b = 72.0 * n_layer, 12.0 * n_layer * seq_len
    return (-b + math.sqrt(b * b + 4 * a * M)) / (2 * a)


def shape_candidates(M: float, seq_len: int, layers: tuple[int, int], widths: tuple[int, int],
                     multiple: int) -> list[tuple[int, int, float]]:
    """``(L, d, M(L, d))`` for every L in ``layers`` and the multiples of ``multiple`` next to the exact
    width, within ``widths`` (inclusive bounds)."""
    out = []
    lo_d = max(multiple, -(-widths[0] // multiple) * multiple)
    hi_d = widths[1] // multiple * multiple
    for L in range(layers[0], layers[1] + 1):
        w = width_for(M, L, seq_len)
        for d in {math.floor(w / multiple) * multiple, math.ceil(w / multiple) * multiple}:
            d = min(max(d, lo_d), hi_d)
            if lo_d <= d <= hi_d:
                out.append((L, d, non_embedding_flops(L, d, seq_len)))
    return sorted(set(out))


def nearest_shape(M: float, seq_len: int = PAPER_SEQ_LEN, *, layers: tuple[int, int] = (1, 256),
                  widths: tuple[int, int] = (64, 65536), multiple: int = 64, aspect: float = 100.0,
                  rel_tol: float = 0.05) -> Shape:
    """The (L, d) whose M is closest to ``M``, preferring ``d/L ≈ aspect`` among those within ``rel_tol``.

    ``layers`` and ``widths`` are inclusive ranges; d is a multiple of ``multiple``. When no shape is
    within ``rel_tol`` (a target below the smallest or above the largest shape), the closest M wins.
    """
    if not (math.isfinite(M) and M > 0):
        raise ConfigError(f"M must be a positive number of FLOPs per token (got {M})")
    if multiple <= 0 or multiple % 2:
        raise ConfigError(f"the width multiple must be a positive even number (got {multiple})")
    if not (1 <= layers[0] <= layers[1]) or not (0 < widths[0] <= widths[1]) or widths[1] < multiple:
        raise ConfigError(f"bad shape ranges: layers {layers}, widths {widths} (multiple {multiple}); give "
                          "min <= max, with a maximum width of at least one multiple")
    cands = shape_candidates(M, seq_len, layers, widths, multiple)
    if not cands:
        raise ConfigError(f"no shape with layers in {layers} and widths in {widths} (multiples of {multiple})")
    L, d, m = pick_shape(M, cands, aspect=aspect, rel_tol=rel_tol)
    heads, head_dim = default_heads(d)
    return Shape(L, d, heads, head_dim, m, M)


def pick_shape(M: float, candidates: list[tuple[int, int, float]], *, aspect: float,
               rel_tol: float = 0.05, aspect_weight: float | None = None) -> tuple[int, int, float]:
    """One of the ``(L, d, M)`` candidates for a target ``M``.

    By default: among those within ``rel_tol`` of ``M``, the one with ``d/L`` closest to ``aspect`` (in
    log), else the one with the closest M. With ``aspect_weight`` w: the one minimising
    ``|ln(M_c/M)| + w·|ln((d/L)/aspect)|`` (a coarse grid, where the shape family matters more than M).
    """

    def err(c):
        return abs(math.log(c[2] / M))

    def skew(c):
        return abs(math.log(c[1] / c[0] / aspect))

    if aspect_weight is not None:
        return min(candidates, key=lambda c: (err(c) + aspect_weight * skew(c), err(c)))
    close = [c for c in candidates if err(c) <= math.log1p(rel_tol)]
    if close:
        return min(close, key=lambda c: (skew(c), err(c)))
    return min(candidates, key=lambda c: (err(c), skew(c)))


@dataclass(frozen=True)
class Suggestion:
    """What the laws say for one budget: hyper-parameters, allocation, and a concrete shape."""

    hyper: HyperParams
    allocation: Allocation
    shape: Shape
    n_vocab: int

    @property
    def shape_tokens(self) -> float:
        """D = C / M of the concrete shape."""
        return self.allocation.budget / self.shape.M

    def as_dict(self) -> dict:
        s = self.shape
        return {"budget": self.allocation.budget, "seq_len": self.hyper.seq_len, **self.hyper.as_dict(),
                **self.allocation.as_dict(), "shape": s.as_dict(), "shape_tokens": self.shape_tokens,
                "shape_non_embedding_params": six_n1(s.n_layer, s.d) / 6,
                "shape_params_with_vocab": six_n2(s.n_layer, s.d, self.n_vocab) / 6, "n_vocab": self.n_vocab}


def suggest(budget: float, seq_len: int = PAPER_SEQ_LEN, *, n_vocab: int = PAPER_VOCAB, multiple: int = 64,
            aspect: float = 100.0) -> Suggestion:
    """η_opt, B_opt, M_opt, D_opt for ``budget`` and the nearest (L, d) to M_opt."""
    hyper = optimal_hyperparams(budget, seq_len)
    alloc = optimal_allocation(budget)
    shape = nearest_shape(alloc.M_opt, seq_len, multiple=multiple, aspect=aspect)
    return Suggestion(hyper, alloc, shape, n_vocab)


__all__ = ["Shape", "Suggestion", "default_heads", "nearest_shape", "pick_shape", "shape_candidates", "suggest",
           "width_for"]
