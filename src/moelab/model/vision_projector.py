"""DeepSeek-VL2's adaptor (``downsample_mlp_gelu``, docs/methods.md §12): the encoder's P = g'×g' patch
vectors of one view compressed 2×2 and projected into the language model's width.

Legend: B views, g' = √P patches per side (27), d the downsampling (2), g = ⌈g'/d⌉ (14), C encoder
width (1152), D the language model's width.

    x_BPC -> [B, C, g', g'] -> zero-pad bottom/right to d·g -> unfold d×d, stride d
          -> [B, g·g, C·d·d]  (each vector channel-major: c, then the row kh, then the column kw)
          -> Linear(C·d·d -> D) -> GELU -> Linear(D -> D) -> [B, g·g, D]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def unfold_tokens(x_BPC: torch.Tensor, downsample: int = 2) -> torch.Tensor:
    """``[B, P, C]`` -> ``[B, g², C·d²]`` (module docstring), zero padding where g' is not a multiple of d."""
    B, P, C = x_BPC.shape
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"the encoder's {P} patch vectors do not form a square grid")
    g = -(-side // downsample)
    x = x_BPC.transpose(1, 2).reshape(B, C, side, side)
    x = F.pad(x, (0, g * downsample - side, 0, g * downsample - side))
    return F.unfold(x, kernel_size=downsample, stride=downsample).transpose(1, 2)      # [B, g², C·d²]


class VisionProjector(nn.Module):
    """forward(``[B, P, C]``) -> ``[B, g², D]``."""

    def __init__(self, vision_width: int, lm_width: int, downsample: int = 2):
        super().__init__()
        self.downsample = downsample
        self.layers = nn.Sequential(nn.Linear(vision_width * downsample ** 2, lm_width), nn.GELU(),
                                    nn.Linear(lm_width, lm_width))

    def forward(self, x_BPC: torch.Tensor) -> torch.Tensor:
        return self.layers(unfold_tokens(x_BPC, self.downsample))


__all__ = ["VisionProjector", "unfold_tokens"]
