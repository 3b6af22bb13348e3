"""Settings of a number-probe run (:mod:`moelab.analysis.probes`): what is probed, how, and where to steer.

    settings = ProbeSettings(n_per_length=200, steer_alphas=(2.0, 16.0))
    settings.validate()                    # a ConfigError names the first bad field
    default_steer_layers(30)               # (14, ..., 19): the paper's blocks 14-19 of 32, as residual states
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moelab.analysis.probes_data import DIGIT_LENGTHS, MAX_DIGITS, PROMPT_TEMPLATES
from moelab.errors import ConfigError, MoelabError

TARGETS = ("a", "b", "o", "sum")
#: which hidden-state position each target is read at
TARGET_POSITION = {"a": "a", "b": "b", "o": "last", "sum": "last"}
#: NumProbe steers blocks 14..19 of Llama-2-7B's 32; scaled to other depths (see default_steer_layers)
PAPER_STEER_BLOCKS, PAPER_DEPTH = (14, 19), 32


class ProbeError(MoelabError):
    """A probe run cannot go on (a model without the expected layers, too few usable answers, ...)."""


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------
@dataclass
class ProbeSettings:
    """Everything that defines a probe run (recorded in results.json).

    ``n_per_length`` problems per operand length (the paper: 1000, i.e. 9,000 in all); ``steer_layers``
    None → :func:`default_steer_layers`; ``steer_n`` steering problems of ``steer_digits`` digits
    (0 → no steering), each steered once per strength in ``steer_alphas`` (the paper: 2); ``mlp_epochs``
    0 → no MLP probe.
    """

    n_per_length: int = 1000
    lengths: tuple[int, ...] = DIGIT_LENGTHS
    seed: int = 0
    prompt_variant: str = "code"
    ridge_lambda: float = 0.1
    mlp_hidden: int = 256
    mlp_epochs: int = 10
    max_new_tokens: int = 30
    batch_size: int = 32
    steer_layers: tuple[int, ...] | None = None
    steer_alphas: tuple[float, ...] = (2.0,)
    steer_n: int = 200
    steer_digits: int = 4

    def validate(self) -> None:
        if not self.lengths:
            raise ConfigError("give at least one operand length (e.g. 2-10, the paper's)")
        bad = [d for d in self.lengths if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIGITS]
        if bad:
            raise ConfigError(f"operand lengths must be from 1 to {MAX_DIGITS} digits (got {bad[0]!r}); the paper "
                              "uses 2-10")
        if self.prompt_variant not in PROMPT_TEMPLATES:
            raise ConfigError(f"unknown prompt variant {self.prompt_variant!r}; choose one of "
                              f"{', '.join(PROMPT_TEMPLATES)}")
        if not (self.ridge_lambda > 0 and math.isfinite(self.ridge_lambda)):
            raise ConfigError(f"the ridge penalty must be a positive number (got {self.ridge_lambda}); the paper "
                              "uses 0.1")
        for name in ("mlp_hidden", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.mlp_epochs < 0 or self.steer_n < 0:
            raise ConfigError("mlp-epochs and steer-n must be >= 0 (0 turns that part off)")
        if self.steer_n and not 1 <= self.steer_digits <= MAX_DIGITS:
            raise ConfigError(f"steer-digits must be between 1 and {MAX_DIGITS} (got {self.steer_digits}); the paper "
                              "uses 4")
        if self.steer_n and (not self.steer_alphas or not all(math.isfinite(a) for a in self.steer_alphas)):
            raise ConfigError(f"steer-alpha needs one or more finite numbers (got {self.steer_alphas}); the paper "
                              "uses 2")


def default_steer_layers(n_layers: int) -> tuple[int, ...]:
    """The paper's steered blocks 14–19 of 32, scaled to ``n_layers`` blocks, as residual states.

    Block i's output is state i + 1, so for 32 blocks this is (15, ..., 20); for 30 blocks (14, ..., 19).
    """
    width = PAPER_STEER_BLOCKS[1] - PAPER_STEER_BLOCKS[0] + 1
    first = round(PAPER_STEER_BLOCKS[0] * n_layers / PAPER_DEPTH) + 1
    first = max(1, min(first, n_layers - min(width, n_layers) + 1))
    return tuple(range(first, min(first + width, n_layers + 1)))


__all__ = ["PAPER_DEPTH", "PAPER_STEER_BLOCKS", "TARGETS", "TARGET_POSITION", "ProbeError", "ProbeSettings",
           "default_steer_layers"]
