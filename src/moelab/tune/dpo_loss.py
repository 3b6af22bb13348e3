"""Direct Preference Optimization losses (Rafailov et al. 2023; DeepSeek LLM aligns its chat models with
SFT then DPO, docs/methods.md §10) on sequence log-probabilities.

Legend: B preference pairs; ``logp_*`` the summed log-probabilities of the chosen (w) / rejected (l)
answer tokens under the policy π, ``ref_*`` under the frozen reference; β the temperature.

    h        = (logp_w − ref_w) − (logp_l − ref_l)                  the margin of implicit rewards / β
    sigmoid  = −(1 − ε)·log σ(β h) − ε·log σ(−β h)                   ε: label smoothing (cDPO), 0 = DPO
    ipo      = (h − 1/(2β))²                                         Azar et al. 2023 (β as τ)
    rewards  r_w = β (logp_w − ref_w),  r_l = β (logp_l − ref_l);   accuracy = mean[r_w > r_l]

:func:`sequence_logps` sums the token log-probabilities of the answer positions (labels ≠ −100) of
``logits [B, T, V]`` for ``labels [B, T]`` (next-token: logits at t predict labels at t + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100
LossType = Literal["sigmoid", "ipo"]


@dataclass
class DPOStats:
    loss: torch.Tensor              # scalar, the mean over pairs (differentiable)
    chosen_rewards: torch.Tensor    # [B]
    rejected_rewards: torch.Tensor  # [B]

    @property
    def margin(self) -> float:
        return float((self.chosen_rewards - self.rejected_rewards).mean())

    @property
    def accuracy(self) -> float:
        return float((self.chosen_rewards > self.rejected_rewards).float().mean())


def dpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float = 0.1, loss_type: LossType = "sigmoid", label_smoothing: float = 0.0) -> DPOStats:
    """The DPO loss of B pairs (module docstring); inputs ``[B]``, references without gradient."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (got {beta})")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (got {label_smoothing})")
    ref_w, ref_l = ref_w.detach(), ref_l.detach()
    h = (logp_w - ref_w) - (logp_l - ref_l)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use 'sigmoid' or 'ipo'")
    return DPOStats(losses.mean(), (beta * (logp_w - ref_w)).detach(), (beta * (logp_l - ref_l)).detach())


def sequence_logps(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """``[B]``: Σ over answer positions of log p(label_{t+1} | ≤ t), in fp32."""
    logits = logits_BTV[:, :-1].float()
    targets = labels_BT[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


__all__ = ["DPOStats", "IGNORE", "dpo_loss", "sequence_logps"]
