"""DeepSeek LLM scaling laws (arXiv 2401.02954 §3; docs/methods.md §10).

**Model scale.** DeepSeek LLM measures a model by its non-embedding FLOPs per token ``M`` (forward +
backward, attention included) instead of a parameter count, and compute by ``C = M·D`` for ``D``
training tokens. For ``n_layer`` = L layers of width d, context l_seq and vocabulary V::

    6N1 = 72·L·d²                     6 × non-embedding parameters (12·L·d² per layer stack)
    6N2 = 6N1 + 6·V·d                 ... plus the vocabulary projection
    M   = 72·L·d² + 12·L·d·l_seq      the attention term has coefficient 12, not 6
    C   = M·D

``6N1/M`` and ``6N2/M`` show how far the parameter-based approximations are off at small scale
(Table 3: 0.43 / 1.32 for 8 layers of 512, 0.92 / 0.94 for 80 layers of 8192).

For a :class:`~moelab.config.ModelConfig` the formula above uses its ``num_hidden_layers`` and
``hidden_size`` (the paper's dense shape). The MoE-aware value comes from
:func:`moelab.model.accounting.model_budget`: ``M_active = 6·N_active,non-embedding + 12·L·d·l_seq``,
with routed experts counted at their top-K share (for a dense MHA/SwiGLU model of width 8d/3 the two
agree up to norms).

**Laws** (C in FLOPs, B in tokens), fit by DeepSeek between 1e17 and 3e20::

    η_opt = 0.3118·C^−0.1250          peak learning rate
    B_opt = 0.2920·C^0.3271           batch size in tokens (÷ l_seq for sequences)
    M_opt = 0.1715·C^0.5243           compute-optimal model scale (FLOPs/token)
    D_opt = 5.8316·C^0.4757           compute-optimal data (tokens); M_opt·D_opt = 1.0001·C

A model of scale M should see ``D = C/M`` tokens for a budget C. :func:`nearest_shape` turns an M into
a concrete (L, d) by solving ``72·L·d² + 12·L·d·l_seq = M`` for d at every L, rounding d to a multiple,
and preferring, among shapes within ``rel_tol`` of M, the one whose ``d/L`` is closest to ``aspect``
(a moelab choice; DeepSeek's models have d/L between 64 and 137).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moelab.config import ModelConfig
from moelab.errors import ConfigError


@dataclass(frozen=True)
class PowerLaw:
    """``y = coef · C^exponent``."""

    coef: float
    exponent: float

    def __call__(self, c: float) -> float:
        return self.coef * c ** self.exponent

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.coef:.4g}·C^{self.exponent:.4f}"


#: DeepSeek LLM Eq. 1 (hyper-parameters) and Eq. 4 (allocation).
ETA_OPT = PowerLaw(0.3118, -0.1250)
B_OPT = PowerLaw(0.2920, 0.3271)
M_OPT = PowerLaw(0.1715, 0.5243)
D_OPT = PowerLaw(5.8316, 0.4757)

PAPER_VOCAB = 102400
PAPER_SEQ_LEN = 4096


# --- formulas ------------------------------------------------------------------------------------

def six_n1(n_layer: int, d: int) -> float:
    """``6N1 = 72·L·d²``: six times the non-embedding parameters of a dense layer stack."""
    return 72.0 * n_layer * d * d


def six_n2(n_layer: int, d: int, n_vocab: int) -> float:
    """``6N2 = 72·L·d² + 6·V·d``: 6N1 plus the vocabulary projection."""
    return six_n1(n_layer, d) + 6.0 * n_vocab * d


def non_embedding_flops(n_layer: int, d: int, seq_len: int) -> float:
    """``M = 72·L·d² + 12·L·d·l_seq``: non-embedding training FLOPs per token, attention included."""
    return six_n1(n_layer, d) + 12.0 * n_layer * d * seq_len


@dataclass(frozen=True)
class ShapeFlops:
    """M, 6N1 and 6N2 of a dense shape, and the ratios of Table 3."""

    n_layer: int
    d: int
    seq_len: int
    n_vocab: int
    M: float
    six_n1: float
    six_n2: float

    @property
    def ratio_n1(self) -> float:
        return self.six_n1 / self.M

    @property
    def ratio_n2(self) -> float:
        return self.six_n2 / self.M

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio_n1": self.ratio_n1, "ratio_n2": self.ratio_n2}


def shape_flops(n_layer: int, d: int, seq_len: int = PAPER_SEQ_LEN, n_vocab: int = PAPER_VOCAB) -> ShapeFlops:
    """Table 3 of DeepSeek LLM for one (L, d): ``shape_flops(8, 512).M == 352,321,536``."""
    for name, v in (("n_layer", n_layer), ("d", d), ("seq_len", seq_len), ("n_vocab", n_vocab)):
        if v <= 0:
            raise ConfigError(f"{name} must be positive (got {v})")
    return ShapeFlops(n_layer, d, seq_len, n_vocab, non_embedding_flops(n_layer, d, seq_len),
                      six_n1(n_layer, d), six_n2(n_layer, d, n_vocab))


@dataclass(frozen=True)
class ConfigFlops:
    """FLOPs/token of a model config: the paper's dense formula and the MoE-aware one.

    ``M`` / ``six_n1`` / ``six_n2`` use the config's L, d and vocabulary in the formulas above.
    ``M_active`` is :func:`~moelab.model.accounting.model_budget`'s ``6·N_active,non-emb + 12·L·d·l_seq``
    (the real layer widths, routed experts at K/E). ``C = M·D`` and ``C_active = M_active·D`` are set
    when ``tokens`` (D) is given.
    """

    shape: ShapeFlops
    is_moe: bool
    M_active: float
    total_params: int
    activated_params: int
    embedding_params: int
    tokens: float | None = None

    @property
    def M(self) -> float:
        return self.shape.M

    @property
    def active_non_embedding_params(self) -> int:
        return self.activated_params - self.embedding_params

    @property
    def C(self) -> float | None:
        return None if self.tokens is None else self.M * self.tokens

    @property
    def C_active(self) -> float | None:
        return None if self.tokens is None else self.M_active * self.tokens

    def as_dict(self) -> dict:
        return {**self.shape.as_dict(), "is_moe": self.is_moe, "M_active": self.M_active,
                "total_params": self.total_params, "activated_params": self.activated_params,
                "embedding_params": self.embedding_params,
                "active_non_embedding_params": self.active_non_embedding_params,
                "six_n_active_ratio": 6 * self.active_non_embedding_params / self.M_active,
                "tokens": self.tokens, "C": self.C, "C_active": self.C_active}


def config_flops(cfg: ModelConfig, seq_len: int | None = None, tokens: float | None = None) -> ConfigFlops:
    """M (paper formula), M_active (activated parameters) and, given D = ``tokens``, C = M·D.

    ``seq_len`` defaults to the pre-YaRN context (:func:`~moelab.model.accounting.pretraining_context`).
    Nothing is allocated: the parameters are counted on PyTorch's meta device.
    """
    from moelab.model.accounting import model_budget

    if seq_len is not None and seq_len <= 0:
        raise ConfigError(f"--seq-len must be positive (got {seq_len})")
    if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
        raise ConfigError(f"--tokens must be a positive number of training tokens such as 2e12 (got {tokens})")
    b = model_budget(cfg, seq_len=seq_len)
    shape = shape_flops(cfg.num_hidden_layers, cfg.hidden_size, b.seq_len, cfg.vocab_size)
    return ConfigFlops(shape=shape, is_moe=cfg.is_moe, M_active=float(b.flops_per_token_active),
                       total_params=b.total_params, activated_params=b.activated_params,
                       embedding_params=b.embedding_params, tokens=tokens)


def read_model_config(path: str | Path) -> ModelConfig:
    """A TOML config (``[model]``), a checkpoint directory, or a checkpoint's ``config.json``."""
    from moelab.config import load_model_config
    from moelab.interop.hf_config import read_config_json

    path = Path(path)
    if path.is_dir():
        return read_config_json(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give a TOML config (e.g. configs/tiny.toml), a checkpoint "
                          "directory, or a shape such as 24x2048")
    if path.name == "config.json":
        return read_config_json(path.parent)
    if path.suffix != ".toml":
        raise ConfigError(f"{path}: expected a TOML config, a checkpoint directory or its config.json")
    return load_model_config(path)


# --- laws ----------------------------------------------------------------------------------------

def check_budget(c: float, what: str = "budget") -> float:
    """``c`` as a float if it is a positive, finite number of FLOPs, else a :class:`ConfigError`."""
    try:
        c = float(c)
    except (TypeError, ValueError):
        raise ConfigError(f"the {what} must be a number of FLOPs such as 1e20 (got {c!r})") from None
    if not (math.isfinite(c) and c > 0):
        raise ConfigError(f"the {what} must be a positive number of FLOPs such as 1e20 (got {c:g})")
    return c


@dataclass(frozen=True)
class HyperParams:
    """η_opt and B_opt for a budget; ``batch_sequences`` = B_opt / seq_len (unrounded)."""

    budget: float
    lr: float
    batch_tokens: float
    seq_len: int

    @property
    def batch_sequences(self) -> float:
        return self.batch_tokens / self.seq_len

    @property
    def batch_sequences_rounded(self) -> int:
        return max(1, round(self.batch_sequences))

    def as_dict(self) -> dict:
        return {**asdict(self), "batch_sequences": self.batch_sequences,
                "batch_sequences_rounded": self.batch_sequences_rounded}


def optimal_hyperparams(budget: float, seq_len: int = PAPER_SEQ_LEN) -> HyperParams:
    """Eq. 1: ``η_opt = 0.3118·C^−0.125``, ``B_opt = 0.2920·C^0.3271`` tokens.

    At C = 8.456e22 (DeepSeek 7B) this gives η 4.25e-4 and 2252 sequences of 4096 (the paper trained
    with 4.2e-4 and 2304). The law was fit between 1e17 and 2e19; far below that it is an extrapolation.
    """
    c = check_budget(budget)
    if seq_len <= 0:
        raise ConfigError(f"--seq-len must be positive (got {seq_len})")
    return HyperParams(c, ETA_OPT(c), B_OPT(c), seq_len)


@dataclass(frozen=True)
class Allocation:
    budget: float
    M_opt: float
    D_opt: float

    def as_dict(self) -> dict:
        return asdict(self)


def optimal_allocation(budget: float) -> Allocation:
    """Eq. 4: ``M_opt = 0.1715·C^0.5243``, ``D_opt = 5.8316·C^0.4757`` (their product is 1.0001·C)."""
    c = check_budget(budget)
    return Allocation(c, M_OPT(c), D_OPT(c))


def tokens_for_budget(M: float, budget: float) -> float:
    """The data a model of scale M (FLOPs/token) should see for a budget: ``D = C / M`` tokens."""
    c = check_budget(budget)
    if not (math.isfinite(M) and M > 0):
        raise ConfigError(f"M must be a positive number of FLOPs per token (got {M})")
    return c / M


# --- shapes --------------------------------------------------------------------------------------

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


__all__ = [
    "B_OPT", "D_OPT", "ETA_OPT", "M_OPT", "PAPER_SEQ_LEN", "PAPER_VOCAB", "Allocation", "ConfigFlops",
    "HyperParams", "PowerLaw", "Shape", "ShapeFlops", "Suggestion", "check_budget", "config_flops",
    "default_heads", "nearest_shape", "non_embedding_flops", "optimal_allocation", "optimal_hyperparams",
    "pick_shape", "read_model_config", "shape_candidates", "shape_flops", "six_n1", "six_n2", "suggest",
    "tokens_for_budget", "width_for",
]
