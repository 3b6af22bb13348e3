"""Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024; DeepSeek-Coder-V2 §3.3 trains with
it, docs/methods.md §11): advantages normalised within each prompt's group of G samples, the clipped
policy-gradient objective, and a KL penalty to the reference with the k3 estimator.

Legend: G completions per prompt, B = P·G sequences, T tokens; per token t of sequence i:
``logp`` log π_θ, ``old`` log π_θ_old (the policy that sampled), ``ref`` log π_ref; ``mask`` 1 on
completion tokens.

    A_i      = (r_i − mean_group(r)) / (std_group(r) + δ)                  (std with Bessel's correction)
    ρ_{i,t}  = exp(logp − old)
    obj      = min(ρ·A_i, clip(ρ, 1 − ε, 1 + ε)·A_i)
    KL_{i,t} = exp(ref − logp) − (ref − logp) − 1                           (k3: unbiased, ≥ 0)
    loss     = −(1/B) Σ_i (1/|o_i|) Σ_t mask·(obj − β·KL)

A group whose rewards are all equal has A = 0: it contributes only its KL term (counted in
:attr:`GRPOStats.zero_variance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GRPOStats:
    loss: torch.Tensor          # scalar (differentiable)
    kl: float                   # mean KL over completion tokens
    advantages: torch.Tensor    # [B]
    zero_variance: float        # fraction of groups whose rewards are all equal
    clipped: float              # fraction of completion tokens where the clip was active


def group_advantages(rewards_B: torch.Tensor, group: int, eps: float = 1e-4) -> tuple[torch.Tensor, float]:
    """(A ``[B]``, the fraction of zero-variance groups) for rewards of P consecutive groups of ``group``."""
    if rewards_B.numel() % group:
        raise ValueError(f"{rewards_B.numel()} rewards do not make groups of {group}")
    r = rewards_B.view(-1, group).to(torch.float64)
    std = r.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(r[:, :1])
    adv = (r - r.mean(dim=1, keepdim=True)) / (std + eps)
    return adv.view(-1).to(rewards_B.dtype), float((std.squeeze(1) == 0).float().mean())


def grpo_loss(logp_BT: torch.Tensor, old_BT: torch.Tensor, ref_BT: torch.Tensor, mask_BT: torch.Tensor,
              rewards_B: torch.Tensor, group: int, clip_eps: float = 0.2, beta: float = 0.04,
              adv_eps: float = 1e-4) -> GRPOStats:
    """The GRPO loss of the module docstring; ``old`` and ``ref`` carry no gradient."""
    if clip_eps <= 0 or beta < 0:
        raise ValueError(f"need clip_eps > 0 and beta >= 0 (got {clip_eps}, {beta})")
    adv, zero_var = group_advantages(rewards_B, group, adv_eps)
    old, ref, mask = old_BT.detach(), ref_BT.detach(), mask_BT.to(logp_BT.dtype)
    ratio = torch.exp(logp_BT - old)
    a = adv.to(logp_BT.dtype)[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    obj = torch.minimum(unclipped, clipped)
    kl = torch.exp(ref - logp_BT) - (ref - logp_BT) - 1
    per_token = (obj - beta * kl) * mask
    lengths = mask.sum(-1).clamp(min=1)
    loss = -(per_token.sum(-1) / lengths).mean()
    n = mask.sum().clamp(min=1)
    return GRPOStats(loss, float((kl.detach() * mask).sum() / n), adv.detach(), zero_var,
                     float(((clipped < unclipped).to(mask.dtype) * mask).sum() / n))


__all__ = ["GRPOStats", "group_advantages", "grpo_loss"]
