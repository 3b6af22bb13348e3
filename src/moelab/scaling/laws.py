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

A model of scale M should see ``D = C/M`` tokens for a budget C; :mod:`moelab.scaling.shapes` turns
an M into a concrete (L, d) and :func:`~moelab.scaling.shapes.suggest` puts the laws and a shape together.
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


__all__ = [
    "B_OPT", "D_OPT", "ETA_OPT", "M_OPT", "PAPER_SEQ_LEN", "PAPER_VOCAB", "Allocation", "ConfigFlops",
    "HyperParams", "PowerLaw", "ShapeFlops", "check_budget", "config_flops", "non_embedding_flops",
    "optimal_allocation", "optimal_hyperparams", "read_model_config", "shape_flops", "six_n1", "six_n2",
    "tokens_for_budget",
]
