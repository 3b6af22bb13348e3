"""The gather-based combine of the routed experts (issue 14): each token's K slots gathered and summed
through the plan's inverse permutation instead of ``index_add_``, in the fused kernel (forward and dx)
and in the modular kernels' dispatch/unpermute. Checked against a per-token loop with gradients (fp32,
atol 1e-5) through both implementations of the slot sum, on packed, aligned (16) and padded plans, with
idle experts and zero gates; bitwise determinism (CPU and, marked ``cuda``, GPU); N = 1 and K = 1."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moelab.config import make_config
from moelab.model import expert_ops
from moelab.model.experts import FusedGroupedExperts, RoutedExperts, dispatch, permute, unpermute

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
            n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, moe_intermediate_size=8,
            first_k_dense_replace=0)
IMPLS = ("loop", "grouped_mm", "padded_bmm", "fused")
IDLE = (0, 5, 6, 15)      # no token picks these: empty groups first, in the middle and last


@pytest.fixture(params=["embedding_bag", "gather_sum"])
def sum_path(request, monkeypatch):
    """Runs a test through each implementation of sum_slots (the CUDA one on the CPU too)."""
    devices = ("cuda", "cpu") if request.param == "gather_sum" else ("cuda",)
    monkeypatch.setattr(expert_ops, "GATHER_SUM_DEVICES", devices)
    return request.param


def per_token(x, idx, gates, w_gu, w_down):
    """Oracle: every token through each of its experts, one at a time."""
    I = w_gu.shape[1] // 2
    out = torch.zeros_like(x)
    for t, k in itertools.product(range(x.shape[0]), range(idx.shape[1])):
        e = int(idx[t, k])
        h = F.silu(x[t] @ w_gu[e, :I].T) * (x[t] @ w_gu[e, I:].T)
        out[t] = out[t] + gates[t, k] * (h @ w_down[e].T)
    return out


def routing(n_tokens: int, k: int, n_experts: int = 16, idle=IDLE):
    busy = torch.tensor([e for e in range(n_experts) if e not in idle])
    idx = torch.stack([busy[torch.randperm(len(busy))[:k]] for _ in range(n_tokens)])
    gates = torch.rand(n_tokens, k)
    gates[::3, 0] = 0.0                                  # pairs that are routed but weigh nothing
    return idx, gates.requires_grad_()


def experts_for(impl: str, k: int = 4) -> RoutedExperts:
    m = RoutedExperts(make_config(BASE | {"expert_impl": impl, "num_experts_per_tok": k}))
    m.reset_parameters(0.3)
    return m


def check_against_oracle(got_fn, x, idx, gates, m):
    params = (x, gates, m.gate_up_proj, m.down_proj)
    ref = per_token(x, idx, gates, m.gate_up_proj, m.down_proj)
    got = got_fn()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan_kind", ["packed", "aligned", "padded"])
def test_plan_inverse_names_each_pairs_slot(plan_kind):
    idx, gates = routing(40, 4)
    plan = permute(idx, gates, 16, padded=plan_kind == "padded", align=16 if plan_kind == "aligned" else 1)
    assert plan.inverse.shape == (40, 4) and plan.inverse.dtype == torch.long
    assert plan.inverse.unique().numel() == 160                        # a slot per pair, none shared
    assert torch.equal(plan.token[plan.inverse], torch.arange(40)[:, None].expand(40, 4))
    assert torch.equal(plan.gate[plan.inverse], gates.detach())
    start = torch.cumsum(plan.rows, 0) - plan.rows                     # each pair sits in its expert's group
    assert ((plan.inverse >= start[idx]) & (plan.inverse < (start + plan.counts)[idx])).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_combine_matches_per_token_loop_with_gradients(impl, sum_path):
    m = experts_for(impl)
    x = torch.randn(40, 32, requires_grad=True)
    idx, gates = routing(40, 4)
    check_against_oracle(lambda: m(x, idx, gates), x, idx, gates, m)


@pytest.mark.parametrize("via", ["fused", "modular"])
def test_aligned_plan_through_the_gather_combine(via, sum_path):
    """align = 16 (bf16 on the CPU): slots shifted by padding after every group, empty groups included."""
    m = experts_for("grouped_mm")
    x = torch.randn(40, 32, requires_grad=True)
    idx, gates = routing(40, 4)
    plan = permute(idx, gates, 16, align=16)
    assert (plan.rows > plan.counts).any()                             # padding between groups

    def run():
        if via == "modular":
            return unpermute(m._grouped(dispatch(x, plan), plan.rows), plan, 40)
        offs = torch.cumsum(plan.rows, 0).to(torch.int32)
        return FusedGroupedExperts.apply(x, plan.token, plan.inverse, plan.gate, offs, m.gate_up_proj,
                                         m.down_proj)
    check_against_oracle(run, x, idx, gates, m)


@pytest.mark.parametrize("n_tokens,k", [(1, 4), (1, 1), (40, 1)])
@pytest.mark.parametrize("impl", IMPLS)
def test_one_token_and_one_expert_per_token(impl, n_tokens, k, sum_path):
    """N = 1 with autograd (not a decode step: the requested kernel runs) and K = 1 (bags of one slot)."""
    m = experts_for(impl, k)
    x = torch.randn(n_tokens, 32, requires_grad=True)
    idx, gates = routing(n_tokens, k)
    check_against_oracle(lambda: m(x, idx, gates), x, idx, gates, m)


def test_unpermute_refuses_a_plan_of_other_tokens():
    idx, gates = routing(5, 4)
    plan = permute(idx, gates, 16)
    with pytest.raises(ValueError, match="routes 5 tokens, not 6"):
        unpermute(torch.randn(20, 32), plan, 6)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_identical_calls_are_bitwise_identical(cpu_and_gpu, impl):
    """Outputs and every gradient, twice: no atomics anywhere in the combine or dx. On the GPU in bf16
    (what the fused kernel takes there), on the CPU in fp32 and bf16 autocast."""
    device = cpu_and_gpu
    modes = ["bf16"] if device.type == "cuda" else ["fp32", "autocast"]
    for mode in modes:
        m = experts_for(impl).to(device)
        if mode == "bf16":
            m = m.to(torch.bfloat16)
        N = 2048
        x = torch.randn(N, 32, device=device, dtype=m.down_proj.dtype, requires_grad=True)
        idx, gates = routing(N, 4)
        idx, gates = idx.to(device), gates.detach().to(device).requires_grad_()
        g = torch.randn(N, 32, device=device)
        runs = []
        for _ in range(2):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
                y = m(x, idx, gates)
            runs.append((y, *torch.autograd.grad(y.float(), (x, gates, m.gate_up_proj, m.down_proj), g)))
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b), (impl, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_sum_implementations_agree(monkeypatch, dtype):
    idx, _ = routing(64, 6)
    plan = permute(idx, torch.rand(64, 6), 16, align=16)
    y = torch.randn(plan.token.numel(), 24).to(dtype)
    want = y.double()[plan.inverse].sum(1)
    outs = []
    for devices in (("cuda",), ("cuda", "cpu")):
        monkeypatch.setattr(expert_ops, "GATHER_SUM_DEVICES", devices)
        outs += [expert_ops.sum_slots(y, plan.inverse), expert_ops.sum_slots(y, plan.inverse, dtype=torch.float32)]
    tol = 1e-6 if dtype == torch.float32 else 1e-2                     # bf16: one rounding of the fp32 sum
    for out, out_dtype in zip(outs, [dtype, torch.float32] * 2, strict=True):
        assert out.dtype == out_dtype
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_gate_helpers_equal_the_fp32_round_trip_bitwise():
    """gated and rowdot skip the fp32 copies, not the fp32 arithmetic."""
    a, b = torch.randn(50, 24).bfloat16(), torch.randn(50, 24).bfloat16()
    gate = torch.rand(50)
    want = (a.float() * gate[:, None]).bfloat16()
    assert torch.equal(expert_ops.gated(a, gate), want)
    assert torch.equal(expert_ops.gated(a.clone(), gate, inplace=True), want)
    assert torch.equal(expert_ops.rowdot(a, b), (a.float() * b.float()).sum(1))
    assert expert_ops.rowdot(a, b).dtype == torch.float32


def test_expert_counts_equal_bincount(cpu_and_gpu):
    """The routed rows per expert without bincount's host sync: equal to bincount, idle experts 0."""
    device = cpu_and_gpu
    for shape in [(40, 4), (1, 1), (0, 4), (7, 3, 2)]:
        ids = torch.randint(0, 16, shape, device=device)
        ids[ids == 5] = 6                                   # an idle expert in the middle
        got = expert_ops.expert_counts(ids, 16)
        assert got.dtype == torch.int64 and got.device.type == device.type
        assert torch.equal(got.cpu(), torch.bincount(ids.reshape(-1).cpu(), minlength=16))


@pytest.mark.cuda
@torch.no_grad()
def test_a_many_token_decode_step_of_the_experts_never_syncs(gpu):
    """At batch 32 a V2-Lite decode step routes N·K ≥ E rows: the fused kernel (permute, grouped GEMMs,
    combine) must not wait for the host, or no CUDA graph can hold the step (decode --decode graph). The CPU
    stand-in: tests/model/test_traceable.py (the whole model traces as one dynamo graph)."""
    experts = RoutedExperts(make_config(BASE | {"expert_impl": "fused"})).to(gpu, torch.bfloat16)
    experts.reset_parameters(0.3)
    x = torch.randn(32, 32, device=gpu, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(32)]).to(gpu)
    gates = torch.rand(32, 4, device=gpu)
    ref = experts(x, idx, gates)                            # first call: the grouped_mm probe may sync
    if gpu.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        y = experts(x, idx, gates)
    finally:
        if gpu.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_activation_backward_is_one_graph_and_equal(dtype):
    """``fused+compile`` compiles the SwiGLU activation's backward: it must trace whole (an ``out=`` into a
    column half broke it in two, leaving part of it eager) and give eager's gradients."""
    M, I = 40, 8
    h, gate, da = torch.randn(M, 2 * I, dtype=dtype), torch.rand(M), torch.randn(M, I, dtype=dtype)
    ref = expert_ops.act_backward(h, gate, da.clone())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(expert_ops.act_backward)(h, gate, da.clone())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    got = torch.compile(expert_ops.act_backward, backend="eager")(h, gate, da.clone())
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **tol)
