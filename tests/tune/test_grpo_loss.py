"""The GRPO loss on a fixed batch of samples and rewards equals a float64 loop over the formula of
DeepSeekMath (group-normalised advantages, clipped ratio, k3 KL), value and gradient."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from moelab.tune.grpo_loss import group_advantages, grpo_loss


def _direct(logp, old, ref, mask, rewards, G, eps_clip, beta, adv_eps):
    B = len(rewards)
    adv = []
    for p in range(B // G):
        r = rewards[p * G:(p + 1) * G]
        m, s = statistics.fmean(r), statistics.stdev(r)
        adv += [(x - m) / (s + adv_eps) for x in r]
    total = 0.0
    for i in range(B):
        acc, n = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            obj = min(ratio * adv[i], min(max(ratio, 1 - eps_clip), 1 + eps_clip) * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            acc += obj - beta * kl
            n += 1
        total += acc / max(n, 1)
    return -total / B


def test_loss_and_gradient_equal_the_formula():
    g = torch.Generator().manual_seed(0)
    B, T, G = 6, 5, 3
    logp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 2).requires_grad_(True)
    old = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2   # some ratios clip
    ref = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]] * 2, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 0.5], dtype=torch.float64)    # the 2nd group: no variance
    stats = grpo_loss(logp, old, ref, mask, rewards, G, clip_eps=0.2, beta=0.04)
    args = (old.tolist(), ref.tolist(), mask.tolist(), rewards.tolist(), G, 0.2, 0.04, 1e-4)
    assert float(stats.loss.detach()) == pytest.approx(_direct(logp.tolist(), *args), rel=1e-12)
    assert stats.zero_variance == 0.5 and 0 < stats.clipped < 1 and stats.kl > 0
    stats.loss.backward()
    for i, t in [(0, 0), (0, 2), (1, 4), (2, 0), (0, 3)]:
        vals = logp.detach().clone()
        vals[i, t] += 1e-6
        up = _direct(vals.tolist(), *args)
        vals[i, t] -= 2e-6
        down = _direct(vals.tolist(), *args)
        assert float(logp.grad[i, t]) == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-10)


def test_advantages():
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3)
    assert zero == 0.5 and adv[3:].tolist() == [0.0, 0.0, 0.0]
    assert adv[:3].tolist() == pytest.approx([2 / 3 / (3 ** -0.5 + 1e-4), -1 / 3 / (3 ** -0.5 + 1e-4),
                                              -1 / 3 / (3 ** -0.5 + 1e-4)])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
