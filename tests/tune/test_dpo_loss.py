"""DPO losses on a fixed batch equal a direct float64 implementation of the formulas (value and gradient),
for the sigmoid loss, label smoothing and IPO; sequence log-probabilities equal a per-token loop."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.tune.dpo_loss import dpo_loss, sequence_logps


def _direct(lw, ll, rw, rl, beta, kind, eps):
    """Per pair, in Python floats (float64): the formulas as written in the papers."""
    out = []
    for a, b, c, d in zip(lw, ll, rw, rl, strict=True):
        h = (a - c) - (b - d)
        if kind == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            def logsig(x):
                return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))
            out.append(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))
    return sum(out) / len(out)


@pytest.mark.parametrize("kind, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                             ("sigmoid", 2.0, 0.0)])
def test_loss_and_gradient_equal_the_formula(kind, beta, eps):
    g = torch.Generator().manual_seed(0)
    lw, ll, rw, rl = (torch.randn(6, generator=g, dtype=torch.float64) * 5 - 20 for _ in range(4))
    lw.requires_grad_(True)
    ll.requires_grad_(True)
    stats = dpo_loss(lw, ll, rw, rl, beta, kind, eps)
    want = _direct(lw.tolist(), ll.tolist(), rw.tolist(), rl.tolist(), beta, kind, eps)
    assert float(stats.loss) == pytest.approx(want, rel=1e-12, abs=1e-12)
    stats.loss.backward()
    step = 1e-6                                            # central differences of the direct formula
    for tensor, pos in ((lw, 0), (ll, 1)):
        for i in range(6):
            vals = [lw.tolist(), ll.tolist()]
            vals[pos][i] += step
            up = _direct(vals[0], vals[1], rw.tolist(), rl.tolist(), beta, kind, eps)
            vals[pos][i] -= 2 * step
            down = _direct(vals[0], vals[1], rw.tolist(), rl.tolist(), beta, kind, eps)
            assert float(tensor.grad[i]) == pytest.approx((up - down) / (2 * step), rel=1e-5, abs=1e-9)
    assert stats.chosen_rewards.tolist() == pytest.approx((beta * (lw - rw)).tolist())
    assert 0 <= stats.accuracy <= 1


def test_sequence_logps_equal_a_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 6, 0, -100, -100]])
    got = sequence_logps(logits, labels)
    for b in range(2):
        want = sum(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                   for t in range(1, 5) if labels[b, t] != -100)
        assert float(got[b]) == pytest.approx(want, rel=1e-6)


def test_bad_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="unknown"):
        dpo_loss(x, x, x, x, loss_type="hinge")
