"""Every expert kernel and attention path in the two GPU precisions, on the CPU and (marked ``cuda``) on
the GPU: bf16 autocast over fp32 master weights, and pure bf16 weights.

The oracle is the per-token loop in float64 over the operands the kernel sees (x and weights rounded to
bf16), so the only differences left are bf16 roundings of intermediates: compared as a relative error of
the whole tensor (``rel``), forward and every gradient.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import moelab.model.experts as experts_mod
from moelab.model.experts import KERNELS, RoutedExperts
from moelab.model.transformer import DeepSeekForCausalLM

MODES = ("autocast", "bf16")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def per_token_f64(x, idx, gates, w_gu, w_down):
    """Oracle: each token through each of its experts, in float64. x ``[N, H]`` -> ``[N, H]``."""
    I = w_gu.shape[1] // 2
    out = torch.zeros_like(x)
    for t, k in itertools.product(range(x.shape[0]), range(idx.shape[1])):
        e = int(idx[t, k])
        h = F.silu(x[t] @ w_gu[e, :I].T) * (x[t] @ w_gu[e, I:].T)
        out[t] = out[t] + gates[t, k] * (h @ w_down[e].T)
    return out


def make_experts(tiny_config, impl: str, device: torch.device, mode: str) -> RoutedExperts:
    m = RoutedExperts(tiny_config(expert_impl=impl))
    m.reset_parameters(0.3)
    m = m.to(device)
    return m.to(torch.bfloat16) if mode == "bf16" else m


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", KERNELS)
def test_every_kernel_forward_and_backward_in_both_precisions(tiny_config, cpu_and_gpu, monkeypatch, impl, mode):
    device = cpu_and_gpu
    substituted = []
    monkeypatch.setattr(experts_mod, "log_choice", lambda req, choice: substituted.append(choice))
    m = make_experts(tiny_config, impl, device, mode)
    N, E, K = 96, m.n_experts, 2
    x = torch.randn(N, 32, device=device, dtype=torch.float32 if mode == "autocast" else torch.bfloat16,
                    requires_grad=True)
    idx = torch.stack([torch.randperm(E - 2)[:K] for _ in range(N)]).to(device)   # the last 2 experts idle
    gates = torch.rand(N, K, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
        y = m(x, idx, gates)
    assert y.dtype == torch.bfloat16
    g = torch.randn(N, 32, device=device)
    got = torch.autograd.grad(y.float(), (x, gates, m.gate_up_proj, m.down_proj), g)
    # master weights keep their dtype, and so do their gradients
    assert [t.dtype for t in got] == [x.dtype, torch.float32, m.gate_up_proj.dtype, m.down_proj.dtype]
    missing = experts_mod.grouped_mm_missing(device, torch.bfloat16)   # torch 2.8-2.10: no CPU grouped_mm
    if missing is None or impl in ("loop", "padded_bmm"):
        assert substituted == [], f"{impl} ran as {substituted}"  # bf16 operands: the requested kernel runs
    else:
        assert substituted and all(c.reason == missing for c in substituted), substituted

    ops = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (x, m.gate_up_proj, m.down_proj)]
    gd = gates.detach().double().requires_grad_()
    ref = per_token_f64(ops[0], idx, gd, ops[1], ops[2])
    want = torch.autograd.grad(ref, (ops[0], gd, ops[1], ops[2]), g.double())
    assert rel(y, ref) < 1e-2
    for name, a, b in zip(("x", "gates", "gate_up_proj", "down_proj"), got, want, strict=True):
        assert rel(a, b) < 2e-2, name
    assert got[2][E - 2:].abs().sum() == 0 and got[3][E - 2:].abs().sum() == 0    # idle experts: no gradient


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attn", ["naive", "absorb"])
@pytest.mark.parametrize("impl", KERNELS)
def test_whole_model_trains_in_both_precisions(tiny_config, cpu_and_gpu, impl, attn, mode):
    """Forward + backward of the tiny MoE with each kernel and attention path: logits near the fp32
    model's, finite gradients of the masters' dtype, and an optimizer step that lowers the loss."""
    device = cpu_and_gpu
    ref = DeepSeekForCausalLM.from_config(tiny_config(expert_impl="loop", attn_impl=attn), seed=0).to(device)
    model = DeepSeekForCausalLM.from_config(tiny_config(expert_impl=impl, attn_impl=attn), seed=0).to(device)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    x = torch.randint(0, 320, (4, 24), device=device)
    with torch.no_grad():
        want = ref(x).logits
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
            logits = model(x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, 320), x[:, 1:].reshape(-1))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(gr is not None and gr.dtype == p.dtype and torch.isfinite(gr).all()
                   for gr, p in zip(grads, [p for p in model.parameters() if p.requires_grad], strict=True))
        if not losses:
            assert rel(logits.detach(), want) < 3e-2
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
