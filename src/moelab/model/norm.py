"""RMSNorm, computed in fp32 like the reference and Hugging Face implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dimension; x ``[..., D]`` -> ``[..., D]``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x·rsqrt(mean(x²) + eps) in fp32, rounded to x's dtype, then the weight, as the references order it.
        # F.rms_norm computes in fp32 for bf16/fp16 inputs (fp64 in fp64) and rounds once (bit-identical on
        # the CPU, tested): one fused kernel on CUDA where the spelled-out version is seven with its two
        # casts, and a decode step runs three norms per layer. (.to: autocast may return fp32.)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
