"""Next-token selection: greedy, temperature, top-k, top-p (nucleus).

logits ``[B, V]`` -> token ids ``[B]``. Filtering follows the usual order: temperature, then
top-k, then top-p, then a draw from the renormalised distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.errors import MoelabError


@dataclass
class SamplingConfig:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0        # 0 = off
    top_p: float = 1.0    # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise MoelabError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy")
        if self.top_k < 0:
            raise MoelabError(f"top_k must be >= 0 (got {self.top_k}); 0 turns it off")
        if not 0 < self.top_p <= 1:
            raise MoelabError(f"top_p must lie in (0, 1] (got {self.top_p}); 1 turns it off")
        if self.temperature == 0:
            self.greedy = True


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits ``[B, V]`` fp32."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Pick the next token for each row. logits ``[B, V]`` -> ``[B]`` int64."""
    logits = logits.to(torch.float32)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
