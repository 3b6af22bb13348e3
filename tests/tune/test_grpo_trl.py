"""moelab's GRPO loss equals TRL's on the same per-token log-probabilities (value and gradient with respect to
the policy log-probabilities, float64): β = 0 and β = 0.04, ε = 0.2, old log-probabilities inside the clip range,
outside it (both clip sides active), and equal to the current ones (TRL's "no old_per_token_logps" path, which is
moelab's first step of a sample batch); completions of different lengths through the mask (an empty one
included); one group whose rewards are all equal.

TRL (1.x) computes the loss only inside ``GRPOTrainer._compute_loss``. The test builds the smallest trainer object
that method reads (no model, no data, no accelerator) with ``loss_type="grpo"`` — the per-sequence mean over
completion tokens, then the mean over sequences, as in DeepSeekMath and moelab — and
``importance_sampling_level="token"``, and stands in for the forward pass by replacing the instance's
``_get_per_token_logps_and_entropies`` with a function that returns the test's log-probabilities. TRL's
``_compute_loss`` is handed ready advantages; it normalises rewards inline in ``_generate_and_score_completions``
(a generation method that needs a model, tokenizer and reward functions), so the advantages come from a
two-line restatement of that formula (``scale_rewards="group"``, one reward function) around TRL's own
``nanstd``; ``group_advantages`` is compared with it, and the loss test feeds TRL those advantages while
moelab computes its own from the rewards.

Conventions: both use the group std with Bessel's correction and add δ = 1e-4 to the std, both clip symmetrically
(``epsilon_low = epsilon_high = ε``), use the k3 KL estimate added with weight β to the per-token loss, and clamp
an empty completion's length to 1; TRL's logged ``kl`` and ``clip_ratio/region_mean`` are moelab's ``kl`` and
``clipped``. One difference, in logging only: TRL counts a group as zero-variance when its std is
``isclose`` to 0 (absolute tolerance 1e-8), moelab when it is exactly 0, so rewards that differ by less than
about 1e-8 are zero-variance for TRL and not for moelab (their advantages agree either way). And one of
precision: ``nanstd`` computes its Bessel factor ``count / (count - 1)`` in torch's default dtype (float32), so on
float64 rewards TRL's advantages are ~1e-8 off the exact ones; the float64 comparisons run it with float64 as the
default dtype, and TRL's float32 path is checked to float32 tolerance.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from moelab.tune.grpo_loss import group_advantages, grpo_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl is not installed (pip install 'moelab[dev]')")
nanstd = pytest.importorskip("trl.trainer.utils").nanstd

G = 4
REWARDS = [1.0, 0.0, 0.0, 1.0,          # binary rewards
           0.5, 0.5, 0.5, 0.5,          # zero variance: A = 0, only the KL term is left
           0.9, -0.3, 0.2, 0.0]         # graded rewards
LENGTHS = [5, 3, 1, 6, 2, 6, 4, 0, 6, 3, 5, 2]   # completion tokens per sequence (one empty completion)
T = 6


def _trl_advantages(rewards: torch.Tensor, group: int, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's reward normalisation (``sum_then_normalize``, ``scale_rewards="group"``, one reward function),
    restated from ``GRPOTrainer._generate_and_score_completions``, with TRL's ``nanstd``; (A, is_std_zero).
    ``exact``: run ``nanstd`` with float64 as torch's default dtype, so its Bessel factor is not rounded to float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if exact else previous)
    try:
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    finally:
        torch.set_default_dtype(previous)
    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    return (rewards - mean) / (std + 1e-4), torch.isclose(std, torch.zeros_like(std))


def _trainer(beta: float, eps: float):
    """A GRPOTrainer with only the attributes ``_compute_loss`` reads (its ``__init__`` needs a model and data)."""
    t = trl_grpo.GRPOTrainer.__new__(trl_grpo.GRPOTrainer)
    ident = lambda x: x  # noqa: E731
    attrs = dict(model=SimpleNamespace(training=True), beta=beta, epsilon_low=eps, epsilon_high=eps,
                 loss_type="grpo", importance_sampling_level="token", top_entropy_quantile=1.0,
                 off_policy_mask_threshold=None, aux_loss_enabled=False, use_vllm=False,
                 vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
                 current_gradient_accumulation_steps=1,
                 args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                 accelerator=SimpleNamespace(device=torch.device("cpu"), gather=ident, gather_for_metrics=ident,
                                             reduce=lambda x, reduction="sum": x, num_processes=1))
    for k, v in attrs.items():
        object.__setattr__(t, k, v)
    return t


def _trl_loss(trainer, logp, old, ref, mask, advantages):
    """TRL's loss with ``logp`` standing in for the model's per-token log-probabilities (``old=None``: absent)."""
    object.__setattr__(trainer, "_get_per_token_logps_and_entropies",
                       lambda *a, **kw: (logp, torch.zeros_like(logp), None))
    B = logp.shape[0]
    inputs = {"prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "ref_per_token_logps": ref}
    if old is not None:
        inputs["old_per_token_logps"] = old
    return trainer._compute_loss(None, inputs)


def _batch(old_spread: float, seed: int):
    """logp, old (logp + uniform noise of half-width ``old_spread``), ref, mask; padding positions are finite."""
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1) * old_spread
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    return logp, old, ref, mask


def test_group_advantages_equal_trl():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    want, std_zero = _trl_advantages(rewards, G)
    got, zero_var = group_advantages(rewards, G)
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-15)
    assert torch.all(got[4:8] == 0) and float(got[:4].abs().min()) > 0.5
    assert zero_var == pytest.approx(float(std_zero.view(-1, G)[:, 0].double().mean())) == pytest.approx(1 / 3)
    # one completion per group: both give A = 0 (TRL branches on num_generations == 1; moelab's std is 0)
    assert torch.all(group_advantages(rewards, 1)[0] == 0)
    # the one convention that differs (logging only): a spread below 1e-8 is zero-variance for TRL, not moelab
    tiny = torch.tensor([1.0, 1.0 + 1e-9, 1.0, 1.0], dtype=torch.float64)
    adv, zero_var = group_advantages(tiny, G)
    trl_adv, trl_zero = _trl_advantages(tiny, G)
    assert bool(trl_zero.all()) and zero_var == 0.0
    assert torch.allclose(adv, trl_adv, rtol=1e-12, atol=1e-15)
    # precision, not convention: nanstd's Bessel factor count / (count - 1) is an integer division, float32 under
    # torch's default dtype, so on float64 rewards TRL's advantages are off by ~1e-8 relative (hence ``exact``)
    rounded, _ = _trl_advantages(rewards, G, exact=False)
    assert torch.allclose(got, rounded, rtol=1e-7) and not torch.allclose(got, rounded, rtol=1e-12, atol=0)
    # TRL's working dtype: float32 rewards
    r32 = rewards.float()
    assert torch.allclose(group_advantages(r32, G)[0], _trl_advantages(r32, G, exact=False)[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("case", ["inside_clip", "clipped", "on_policy"])
def test_loss_and_gradient_equal_trl(beta, case):
    eps = 0.2
    spread = {"inside_clip": 0.15, "clipped": 0.8, "on_policy": 0.0}[case]
    logp0, old, ref, mask = _batch(spread, seed=3 + int(beta * 100))
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    trl_adv, _ = _trl_advantages(rewards, G)

    logp_trl = logp0.clone().requires_grad_(True)
    trainer = _trainer(beta, eps)
    want = _trl_loss(trainer, logp_trl, None if case == "on_policy" else old, ref, mask, trl_adv)
    want.backward()

    logp = logp0.clone().requires_grad_(True)
    stats = grpo_loss(logp, logp.detach() if case == "on_policy" else old, ref, mask.bool(), rewards, G,
                      clip_eps=eps, beta=beta)
    stats.loss.backward()

    assert float(stats.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(logp.grad, logp_trl.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(logp.grad[mask == 0] == 0)
    assert float(logp.grad[mask.bool()].abs().max()) > 1e-3          # the gradient is not trivially zero

    metrics = trainer._metrics["train"]
    # TRL's clip masks are cast with .float(): its clip fractions are float32
    assert stats.clipped == pytest.approx(metrics["clip_ratio/region_mean"][-1], rel=1e-6, abs=1e-12)
    if beta:
        assert stats.kl == pytest.approx(metrics["kl"][-1], rel=1e-10)
    else:
        assert "kl" not in metrics
    if case == "clipped":           # both sides of the clip are exercised
        assert metrics["clip_ratio/low_mean"][-1] > 0 and metrics["clip_ratio/high_mean"][-1] > 0
    else:
        assert stats.clipped == 0.0
