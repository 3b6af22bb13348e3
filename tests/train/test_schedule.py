"""LR schedules against hand-computed values at their breakpoints (docs/methods.md §10)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.errors import ConfigError
from moelab.train.schedule import LRSchedule, lr_at

PEAK = 4.2e-4


def approx(x):
    return pytest.approx(x, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "factor"),
    [(0, 1.0), (799, 1.0), (800, 0.316), (899, 0.316), (900, 0.316**2), (999, 0.316**2)],
)
def test_multistep_breakpoints(step, factor):
    assert lr_at(step, total_steps=1000, peak_lr=PEAK, schedule="multistep") == approx(factor * PEAK)


def test_multistep_deepseek_v2_milestones_and_rounding():
    # V2: x0.316 at ~60% and 90%; round(0.6 * 1234) = 740, round(0.9 * 1234) = 1111.
    kw = dict(total_steps=1234, peak_lr=PEAK, schedule="multistep", milestones=(0.6, 0.9))
    assert lr_at(739, **kw) == approx(PEAK)
    assert lr_at(740, **kw) == approx(0.316 * PEAK)
    assert lr_at(1110, **kw) == approx(0.316 * PEAK)
    assert lr_at(1111, **kw) == approx(0.316**2 * PEAK)


def test_warmup_is_linear_to_peak():
    kw = dict(total_steps=1000, peak_lr=PEAK, schedule="multistep", warmup_steps=20)
    assert lr_at(0, **kw) == approx(PEAK / 20)
    assert lr_at(9, **kw) == approx(PEAK * 10 / 20)
    assert lr_at(19, **kw) == approx(PEAK)
    assert lr_at(20, **kw) == approx(PEAK)
    for name in ("cosine", "wsd", "constant"):
        assert lr_at(4, **{**kw, "schedule": name}) == approx(PEAK * 5 / 20)


def test_cosine_start_middle_end():
    kw = dict(total_steps=1001, peak_lr=PEAK, schedule="cosine")
    assert lr_at(0, **kw) == approx(PEAK)
    assert lr_at(500, **kw) == approx(0.55 * PEAK)
    assert lr_at(1000, **kw) == approx(0.1 * PEAK)
    assert lr_at(5000, **kw) == approx(0.1 * PEAK)  # past the end: stays at the floor
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert lr_at(250, **kw) == approx(PEAK * (0.1 + 0.45 * (1 + math.sqrt(0.5))))


def test_cosine_after_warmup():
    kw = dict(total_steps=121, peak_lr=1e-3, schedule="cosine", warmup_steps=20, min_lr_ratio=0.0)
    assert lr_at(19, **kw) == approx(1e-3)
    assert lr_at(20, **kw) == approx(1e-3)  # decay starts at peak
    assert lr_at(70, **kw) == approx(0.5e-3)  # half-way through the 100 decay steps
    assert lr_at(120, **kw) == pytest.approx(0.0, abs=1e-18)


def test_wsd_stable_then_linear_decay():
    kw = dict(total_steps=1000, peak_lr=PEAK, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, **kw) == approx(PEAK)
    assert lr_at(799, **kw) == approx(PEAK)  # last stable step
    assert lr_at(800, **kw) == approx(PEAK - 0.9 * PEAK / 200)  # first of 200 decay steps
    assert lr_at(899, **kw) == approx(PEAK * (1 - 0.9 * 100 / 200))  # half-way: 0.55 peak
    assert lr_at(999, **kw) == approx(0.1 * PEAK)


def test_constant():
    for step in (0, 500, 999, 2000):
        assert lr_at(step, total_steps=1000, peak_lr=PEAK, schedule="constant") == approx(PEAK)


def test_lrschedule_call_and_apply_with_lr_scale():
    sched = LRSchedule(total_steps=1000, peak_lr=PEAK, schedule="multistep", warmup_steps=10)
    assert sched(850) == approx(0.316 * PEAK)
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w1]}, {"params": [w2], "lr_scale": 0.5}], lr=1.0)
    assert sched.apply(opt, 900) == approx(0.316**2 * PEAK)
    assert opt.param_groups[0]["lr"] == approx(0.316**2 * PEAK)
    assert opt.param_groups[1]["lr"] == approx(0.5 * 0.316**2 * PEAK)
    sched.apply(opt, 0)
    assert opt.param_groups[0]["lr"] == approx(PEAK / 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule="cosin"), "did you mean 'cosine'.*multistep, cosine, wsd, constant"),
        (dict(schedule="linear"), "valid schedules: multistep, cosine, wsd, constant"),
        (dict(milestones=(0.9, 0.8)), "strictly increasing"),
        (dict(milestones=(0.8, 0.8)), "strictly increasing"),
        (dict(milestones=(0.0, 0.9)), r"in \(0, 1\)"),
        (dict(milestones=(0.8, 1.0)), r"in \(0, 1\)"),
        (dict(milestones=()), "at least one milestone"),
        (dict(milestones=0.8), "sequence of fractions"),
        (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
        (dict(warmup_steps=1000), "smaller than total_steps"),
        (dict(total_steps=0, warmup_steps=0), "total_steps must be >= 1"),
        (dict(total_steps=10.5), "total_steps must be an integer"),
        (dict(peak_lr=0.0), "peak_lr must be > 0"),
        (dict(peak_lr=float("nan")), "peak_lr must be finite"),
        (dict(gamma=0.0), "gamma must be > 0"),
        (dict(schedule="cosine", min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(schedule="wsd", decay_fraction=0.0), r"decay_fraction must be in \(0, 1\]"),
        (dict(schedule="wsd", total_steps=2, decay_fraction=0.1), "empty decay window"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    args = dict(total_steps=1000, peak_lr=PEAK, schedule="multistep") | kwargs
    with pytest.raises(ConfigError, match=match):
        lr_at(0, **args)
    with pytest.raises(ConfigError, match=match):
        LRSchedule(**args)


def test_warmup_longer_than_first_phase_takes_precedence():
    # 20 steps, warm-up 19: multistep milestones at steps 16 and 18 lie inside the warm-up.
    kw = dict(total_steps=20, peak_lr=1.0, schedule="multistep", warmup_steps=19)
    assert lr_at(17, **kw) == approx(18 / 19)
    assert lr_at(19, **kw) == approx(0.316**2)
    kw = dict(total_steps=10, peak_lr=1.0, schedule="wsd", warmup_steps=9, decay_fraction=0.5, min_lr_ratio=0.0)
    assert lr_at(8, **kw) == approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.0, abs=1e-15)


def test_negative_step_raises():
    with pytest.raises(ConfigError, match="step must be >= 0"):
        lr_at(-1, total_steps=10, peak_lr=1.0, schedule="constant")


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        lr_at(0, total_steps=10, peak_lr=1.0, schedule="nope")
