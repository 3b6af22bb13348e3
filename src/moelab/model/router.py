"""The DeepSeekMoE router: scores, group-limited top-k, bias-corrected selection (docs/methods.md §2, §3).

Legend: N tokens, H hidden, E routed experts, K experts per token, G groups.

    logits = h · Wᵀ                       (fp32, W ``[E, H]``)
    s      = softmax(logits) | sigmoid(logits)
    choice = s + b                         (b: fp32 ``e_score_correction_bias``, selection only)
    groups : group_limited_greedy -> max of s in the group; noaux_tc -> sum of top-2 of choice;
             keep ``topk_group`` groups, mask the rest with -inf
    idx    = TopK(choice, K);   g = s[idx]  (the UNBIASED score)
    g      = g / Σg  if norm_topk_prob;    g *= routed_scaling_factor

Semantics follow Hugging Face's ``DeepseekV3TopkRouter`` (``scale_only_if_unnormalized=true``
reproduces the hub V2 code, which scales only un-normalised weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.model.fp32 import FP32Buffers


@dataclass
class Routing:
    """The router's decision for N tokens."""

    indices: torch.Tensor  # [N, K] int64 chosen experts (unordered)
    weights: torch.Tensor  # [N, K] fp32 gate values applied to the expert outputs
    scores: torch.Tensor   # [N, E] fp32 unbiased scores s
    logits: torch.Tensor   # [N, E] fp32
    batch_shape: tuple[int, ...] | None = None  # (B, T) when N = B·T tokens came from a batch of sequences
    replay: bool = False   # a forward run again to recompute activations (moelab.model.moe.replaying)


class Router(FP32Buffers):
    """forward(x ``[N, H]``) -> :class:`Routing`.

    ``e_score_correction_bias`` ``[E]`` exists for ``topk_method = "noaux_tc"``; it is a persistent fp32
    buffer without gradient. It and the router weight stay fp32 when the model is cast to another
    dtype, and the logits are computed in fp32 even under autocast.
    """

    _fp32_buffers = ("e_score_correction_bias",)
    _fp32_params = ("weight",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.scale_only_if_unnormalized = cfg.scale_only_if_unnormalized
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias: torch.Tensor | None
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):  # routing is decided in fp32, even under autocast
            logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))  # [N, E]
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.method != "greedy" and self.n_group > 1:
            choice = self._mask_groups(choice)
        top = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)                # [N, K]
        indices = top.indices
        # without a bias the chosen values are the scores themselves (group masking keeps the chosen
        # groups' values): no gather, which saves a kernel per layer at every decode step
        weights = top.values if self.e_score_correction_bias is None else scores.gather(1, indices)
        if self.norm_topk_prob and (self.top_k > 1 or not self.scale_only_if_unnormalized):
            # hub V2 (scale_only_if_unnormalized) renormalises only for K > 1; HF V3 always does
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        scaled = not (self.scale_only_if_unnormalized and self.norm_topk_prob and self.top_k > 1)
        if scaled and self.scale != 1.0:                                           # x·1.0 is x: no kernel
            weights = weights * self.scale
        return Routing(indices=indices, weights=weights, scores=scores, logits=logits)

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        N, E, G = choice.shape[0], self.n_experts, self.n_group
        grouped = choice.view(N, G, E // G)
        if self.method == "group_limited_greedy":
            group_scores = grouped.amax(dim=-1)                                    # [N, G]
        else:  # noaux_tc: sum of each group's top-2 biased scores
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
        keep_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~keep_mask[:, :, None], float("-inf")).view(N, E)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()
