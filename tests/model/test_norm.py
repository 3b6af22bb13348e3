"""RMSNorm: the reference formula (fp32 statistics, rounded to the input dtype, then the weight) bit for bit,
and transformers' own DeepseekV2RMSNorm as an independent oracle."""

from __future__ import annotations

import pytest
import torch

from moelab.model.norm import RMSNorm


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 64), (1, 1, 512), (3, 2048)])
def test_rmsnorm_is_the_reference_formula_bit_for_bit(dtype, shape):
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(*shape) * 3).to(dtype)
    out = norm(x)
    assert out.dtype == dtype and torch.equal(out, reference(x, norm.weight, 1e-6))


def test_rmsnorm_gradients_match_the_reference():
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 9, 64, requires_grad=True)
    g = torch.randn(4, 9, 64)
    gx, gw = torch.autograd.grad((norm(x) * g).sum(), (x, norm.weight))
    rx, rw = torch.autograd.grad((reference(x, norm.weight, 1e-6) * g).sum(), (x, norm.weight))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_rmsnorm_equals_transformers():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    ours, theirs = RMSNorm(128, eps=1e-5), DeepseekV2RMSNorm(128, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 128).to(dtype)
        torch.testing.assert_close(ours.to(dtype)(x), theirs.to(dtype)(x), rtol=0, atol=0)
