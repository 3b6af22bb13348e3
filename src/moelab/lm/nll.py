"""Next-token negative log-likelihood: the one place where logits and targets become nats.

    total, n = token_nll(logits_BTV, targets_BT)                  # (float nats, int targets), fp32 sum
    total, n = token_nll(logits_BTV, targets_BT, torch.float64)   # fp32 per token, fp64 sum
    loss = lm_loss(logits_BTV, targets_BT)                        # mean over targets, 0-dim, with a graph

Shapes: ``logits_BTV`` [B, T, V] (any float dtype, scored in fp32); ``targets_BT`` int64 [B, T] on the
same device, where ``targets_BT[b, t]`` is the token that ``logits_BTV[b, t]`` predicts, or
:data:`IGNORE` (−100) when that position is no target (padding, separators, SFT prompts). For a plain
sequence ``ids_BT`` the targets are the next tokens: ``token_nll(logits_BTV[:, :-1], ids_BT[:, 1:])``.

Perplexity is ``exp(Σ total / Σ n)`` over batches; callers add up the pairs (in Python floats, i.e.
float64) so that every consumer — training's validation loss, ``moelab eval ppl``, the pruning study —
reports the same number for the same windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.errors import MoelabError

#: Target value that carries no loss (PyTorch's ``cross_entropy`` default ``ignore_index``).
IGNORE = -100


def token_nll(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """``(Σ −log p(target), #targets)`` over the targets != −100: nats and a count.

    ``dtype`` is the precision of the sum; each token's NLL is an fp32 log-softmax either way.

    * ``torch.float32``: one fused cross-entropy summed in fp32 — training's validation loss and the
      pruning perplexity (a batch holds a few thousand targets, so fp32 rounding stays ~1e-7 relative).
    * ``torch.float64``: only the target rows are log-softmaxed, their NLLs summed in fp64 —
      ``moelab eval ppl``, whose windows may score a few of many positions (sliding stride).
    """
    if dtype == torch.float32:
        total = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="sum",
                                ignore_index=IGNORE)
        return float(total), int((targets_BT != IGNORE).sum())
    if dtype == torch.float64:
        keep_BT = targets_BT != IGNORE
        t_K = targets_BT[keep_BT]                                             # [K]
        if t_K.numel() == 0:
            return 0.0, 0
        # log-softmax of the K scored rows only; reduction="none" is exactly −log_softmax[target]
        nll_K = F.cross_entropy(logits_BTV[keep_BT].float(), t_K, reduction="none")
        return float(nll_K.double().sum()), int(t_K.numel())
    raise MoelabError(f"token_nll sums in torch.float32 or torch.float64 (got {dtype})")


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != −100, the training loss (0-dim fp32 tensor).

    With no target at all (an SFT micro-batch of prompts only) it is 0 with a graph, so that
    ``backward()`` still runs instead of producing NaN from 0 / 0.
    """
    if not bool((targets_BT != IGNORE).any()):
        return logits_BTV.float().sum() * 0.0
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE)


__all__ = ["IGNORE", "lm_loss", "token_nll"]
