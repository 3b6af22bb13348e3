"""Learning-rate schedules as pure functions of the optimizer step (docs/methods.md §10).

Steps are 0-based optimizer steps; at a fixed batch size they are proportional to tokens, so the
papers' "80% of tokens" is ``round(0.8 * total_steps)`` here.

Every schedule starts with the same optional linear warm-up::

    lr(s) = peak * (s + 1) / warmup_steps            for s < warmup_steps

so step 0 already trains (at ``peak / warmup_steps``) and step ``warmup_steps - 1`` reaches the peak.
After the warm-up (``w = warmup_steps``, ``T = total_steps``, ``lo = min_lr_ratio * peak``):

``multistep``  DeepSeek LLM / DeepSeekMoE / V2-Lite: ``peak * gamma**k`` where ``k`` counts the
               milestones ``m`` with ``s >= round(m * T)`` (the boundary step is already decayed).
               Defaults (0.8, 0.9) and gamma 0.316 give 100% / 31.6% / ~10% of peak.
``cosine``     Coder-V2 / Loss-Free 1B: ``lo + (peak - lo) * (1 + cos(pi * p)) / 2`` with
               ``p = (s - w) / (T - 1 - w)``: peak at step ``w``, ``lo`` at the last step ``T - 1``.
``wsd``        warmup-stable-decay: peak, then the last ``D = round(decay_fraction * T)`` steps fall
               linearly, ``peak + (lo - peak) * (s - (T - D) + 1) / D``: the last stable step
               ``T - D - 1`` is at peak, the last step ``T - 1`` at ``lo``.
``constant``   peak (ESFT).

The warm-up takes precedence: in a short run whose first milestone (or wsd decay window) falls inside
the warm-up, the rate ramps to the peak and then continues at the decayed value the formula gives.
Steps past the end (``s >= T``, e.g. a run extended after the fact) keep the last step's value.
Bad settings raise :class:`~moelab.errors.ConfigError` naming the argument and the valid range.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from itertools import pairwise

import torch

from moelab.errors import ConfigError, did_you_mean

SCHEDULES = ("multistep", "cosine", "wsd", "constant")


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return value


def validate_schedule(
    *,
    total_steps: int,
    peak_lr: float,
    schedule: str,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    milestones: tuple[float, ...] = (0.8, 0.9),
    gamma: float = 0.316,
    decay_fraction: float = 0.2,
) -> None:
    """Raise :class:`ConfigError` if the settings do not describe a usable schedule.

    Only the settings the chosen schedule uses are checked beyond their type (e.g. ``milestones``
    only for ``multistep``), so a cosine config may keep the multistep defaults.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown lr schedule {schedule!r}{did_you_mean(str(schedule), SCHEDULES)}; "
            f"valid schedules: {', '.join(SCHEDULES)}"
        )
    total = _check_int("total_steps", total_steps)
    if total < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total}")
    warmup = _check_int("warmup_steps", warmup_steps)
    if warmup < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup}")
    if warmup >= total:
        raise ConfigError(f"warmup_steps ({warmup}) must be smaller than total_steps ({total})")
    peak = _check_float("peak_lr", peak_lr)
    if peak <= 0:
        raise ConfigError(f"peak_lr must be > 0, got {peak}")
    ratio = _check_float("min_lr_ratio", min_lr_ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {ratio}")

    if schedule == "multistep":
        g = _check_float("gamma", gamma)
        if g <= 0:
            raise ConfigError(f"gamma must be > 0, got {g}")
        try:
            ms = tuple(_check_float("milestones", m) for m in milestones)
        except TypeError:
            raise ConfigError(f"milestones must be a sequence of fractions, got {milestones!r}") from None
        if not ms:
            raise ConfigError("multistep needs at least one milestone, e.g. milestones = [0.8, 0.9]")
        if any(not 0.0 < m < 1.0 for m in ms) or any(b <= a for a, b in pairwise(ms)):
            raise ConfigError(
                f"milestones must be strictly increasing fractions of total_steps in (0, 1), got {list(ms)}"
            )
    elif schedule == "wsd":
        f = _check_float("decay_fraction", decay_fraction)
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {f}")
        d = round(f * total)
        if d < 1:
            raise ConfigError(
                f"decay_fraction {f} of {total} steps rounds to an empty decay window; raise one of them"
            )


def lr_at(
    step: int,
    *,
    total_steps: int,
    peak_lr: float,
    schedule: str,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    milestones: tuple[float, ...] = (0.8, 0.9),
    gamma: float = 0.316,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate at 0-based optimizer step ``step`` (see the module docstring for formulas)."""
    validate_schedule(
        total_steps=total_steps, peak_lr=peak_lr, schedule=schedule, warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio, milestones=milestones, gamma=gamma, decay_fraction=decay_fraction,
    )
    return _lr(step, total_steps=total_steps, peak_lr=peak_lr, schedule=schedule, warmup_steps=warmup_steps,
               min_lr_ratio=min_lr_ratio, milestones=milestones, gamma=gamma, decay_fraction=decay_fraction)


def _lr(step, *, total_steps, peak_lr, schedule, warmup_steps, min_lr_ratio, milestones, gamma,
        decay_fraction) -> float:
    """:func:`lr_at` for settings already validated (LRSchedule validates once, not every step)."""
    s = _check_int("step", step)
    if s < 0:
        raise ConfigError(f"step must be >= 0, got {s}")
    total, warmup, peak = int(total_steps), int(warmup_steps), float(peak_lr)
    s = min(s, total - 1)
    if s < warmup:
        return peak * (s + 1) / warmup
    low = float(min_lr_ratio) * peak

    if schedule == "constant":
        return peak
    if schedule == "multistep":
        k = sum(1 for m in milestones if s >= round(float(m) * total))
        return peak * float(gamma) ** k
    if schedule == "cosine":
        span = total - 1 - warmup
        p = 1.0 if span <= 0 else (s - warmup) / span
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * p))
    # wsd
    d = round(float(decay_fraction) * total)
    start = total - d
    if s < start:
        return peak
    return peak + (low - peak) * (s - start + 1) / d


@dataclass(frozen=True)
class LRSchedule:
    """A validated LR schedule: ``sched(step)`` is :func:`lr_at` with these settings.

    ``apply(optimizer, step)`` writes the rate into every param group (no ``LambdaLR`` state to
    checkpoint: the rate is a pure function of the step). A group carrying an ``'lr_scale'`` key gets
    ``lr * lr_scale`` (e.g. a smaller rate for embeddings or a LoRA group).
    """

    total_steps: int
    peak_lr: float
    schedule: str = "multistep"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    milestones: tuple[float, ...] = (0.8, 0.9)
    gamma: float = 0.316
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "milestones", tuple(self.milestones))
        except TypeError:
            raise ConfigError(f"milestones must be a sequence of fractions, got {self.milestones!r}") from None
        validate_schedule(**self._settings())

    def _settings(self) -> dict:
        return {
            "total_steps": self.total_steps, "peak_lr": self.peak_lr, "schedule": self.schedule,
            "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
            "milestones": self.milestones, "gamma": self.gamma, "decay_fraction": self.decay_fraction,
        }

    def __call__(self, step: int) -> float:
        return _lr(step, **self._settings())

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set each param group's ``'lr'`` to ``self(step) * group.get('lr_scale', 1)``; return ``self(step)``."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))
        return lr
