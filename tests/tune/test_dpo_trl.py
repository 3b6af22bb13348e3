"""moelab's DPO loss equals TRL's on the same log-probabilities (value and gradient): the sigmoid loss
(DPO) and IPO. TRL (1.x) computes its loss only inside ``DPOTrainer._compute_loss``; the test builds the
smallest trainer object that method reads (no model, no dataset, no accelerator) and feeds it per-token
log-probabilities through a stand-in model output, with the reference log-probabilities precomputed.

TRL's IPO divides each answer's log-ratio by its number of tokens (a choice its docs say the IPO authors
confirmed); moelab follows the paper's sequence sums. The two agree on one-token answers, and on longer
answers when moelab is given the per-token means. TRL 1.x has no label-smoothed sigmoid (cDPO): its
``label_smoothing`` feeds the "robust" and "exo_pair" losses, which are other formulas; the label-smoothed
loss is checked against the float64 formula in test_dpo_loss.py.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from moelab.tune.dpo_loss import dpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl is not installed (pip install 'moelab[dev]')")


def _trainer(loss_type: str, beta: float):
    """A DPOTrainer with only the attributes ``_compute_loss`` reads (its ``__init__`` needs a model and data)."""
    t = trl_dpo.DPOTrainer.__new__(trl_dpo.DPOTrainer)
    ident = lambda x: x  # noqa: E731
    attrs = dict(model=SimpleNamespace(training=True), beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                 label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
                 aux_loss_enabled=False, use_weighting=False, _total_train_tokens=0, _tp_size=1,
                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                 accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=ident, gather=ident))
    for k, v in attrs.items():
        object.__setattr__(t, k, v)
    return t


def _batch(B: int, lengths: list[int], T: int = 8, seed: int = 0):
    """Per-token answer log-probabilities ``[2B, T-1]`` (chosen rows, then rejected) and the completion mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, T - n:] = 1
    per_token = torch.where(mask[:, 1:].bool(), -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 4, 0.0)
    ref = per_token.sum(1).detach() + torch.randn(2 * B, generator=g, dtype=torch.float64)
    return per_token.requires_grad_(True), mask, ref


def _trl_loss(trainer, per_token, mask, ref):
    B = mask.shape[0] // 2
    zero = torch.zeros_like(per_token)
    out = SimpleNamespace(log_probs=per_token, entropy=zero,
                          mean_logits=zero, is_top1=zero.bool())
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return trainer._compute_loss(lambda **kw: out, inputs, return_outputs=False)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_loss_equals_trl(beta):
    B, lengths = 4, [3, 5, 1, 7, 2, 4, 6, 1]
    per_token, mask, ref = _batch(B, lengths)
    want = _trl_loss(_trainer("sigmoid", beta), per_token, mask, ref)
    want.backward()
    trl_grad = per_token.grad[:, -1].clone()         # d loss / d (any answer token) = d loss / d (its sum)
    seq = per_token.detach().sum(1).requires_grad_(True)
    got = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta, "sigmoid").loss
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    assert torch.allclose(seq.grad, trl_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_loss_equals_trl(beta):
    B = 3
    one, mask1, ref1 = _batch(B, [1] * 6, seed=1)                    # one-token answers: sums = means
    want = _trl_loss(_trainer("ipo", beta), one, mask1, ref1)
    seq = one.detach().sum(1)
    got = dpo_loss(seq[:B], seq[B:], ref1[:B], ref1[B:], beta, "ipo").loss
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    lengths = [2, 5, 3, 1, 6, 4]
    per_token, mask, ref = _batch(B, lengths, seed=2)                # longer answers: TRL's per-token means
    want = _trl_loss(_trainer("ipo", beta), per_token, mask, ref)
    n = torch.tensor(lengths, dtype=torch.float64)
    mean = per_token.detach().sum(1) / n
    got = dpo_loss(mean[:B], mean[B:], ref[:B] / n[:B], ref[B:] / n[B:], beta, "ipo").loss
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
