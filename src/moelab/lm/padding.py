"""Left padding: a batch of token lists of different lengths, aligned to the right.

    ids_BT, mask_BT = left_pad([[5, 6, 7], [9]], pad_id=2)
    # ids_BT  = [[5, 6, 7], [2, 2, 9]]      int64 [B, T_max]
    # mask_BT = [[1, 1, 1], [0, 0, 1]]      int64 [B, T_max], 1 = real token

Generation appends new tokens after the last column, so every prompt must end there: padding goes on
the left, and the attention mask keeps the padding out of attention (and, for moelab models, out of the
position ids). Dimension letters: B batch (number of prompts), T_max the longest prompt.
"""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids_BT`` and ``mask_BT``, int64 [B, T_max], prompts aligned to the right (see the module docstring).

    An empty prompt gives a row of padding with an all-zero mask.
    """
    T = max(len(p) for p in prompts)
    ids_BT = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:    # ids_BT[i, T:] is empty, but torch.tensor([]) would be float
            ids_BT[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_BT[i, T - len(p):] = 1
    return ids_BT, mask_BT


__all__ = ["left_pad"]
