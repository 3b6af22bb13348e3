"""DeepSeekMoE and its router against brute-force per-token oracles (docs/methods.md §1-§3 checks)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moelab.config import make_config
from moelab.model.experts import RoutedExperts
from moelab.model.mlp import SwiGLU
from moelab.model.moe import DeepSeekMoE
from moelab.model.router import Router
from moelab.model.transformer import DeepSeekForCausalLM

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
            n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, moe_intermediate_size=8,
            first_k_dense_replace=0)

ROUTERS = {
    "softmax_greedy": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                           routed_scaling_factor=1.0),
    "softmax_group_limited": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                  norm_topk_prob=False, routed_scaling_factor=16.0),
    "sigmoid_noaux_tc": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                             norm_topk_prob=True, routed_scaling_factor=2.5),
    "softmax_noaux_tc_norm": dict(scoring_func="softmax", topk_method="noaux_tc", n_group=2, topk_group=1,
                                  norm_topk_prob=True, routed_scaling_factor=1.0),
    "hub_v2_scale_rule": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True,
                              routed_scaling_factor=3.0, scale_only_if_unnormalized=True),
}


def brute_force_route(x, weight, bias, c):
    """Per-token reference written from docs/methods.md §2 with plain Python loops."""
    E, K = c.n_routed_experts, c.num_experts_per_tok
    G, TG = (c.n_group or 1), (c.topk_group or 1)
    out = []
    for row in x.double():
        logits = [float(row @ weight[e].detach().double()) for e in range(E)]
        if c.scoring_func == "softmax":
            z = torch.tensor(logits).softmax(0).tolist()
        else:
            z = torch.tensor(logits).sigmoid().tolist()
        choice = [z[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        allowed = set(range(E))
        if c.topk_method != "greedy" and G > 1:
            size = E // G
            gscore = []
            for g in range(G):
                vals = sorted(choice[g * size:(g + 1) * size], reverse=True)
                gscore.append(vals[0] if c.topk_method == "group_limited_greedy" else vals[0] + vals[1])
            groups = sorted(range(G), key=lambda g: gscore[g], reverse=True)[:TG]
            allowed = {e for g in groups for e in range(g * size, (g + 1) * size)}
        chosen = sorted(allowed, key=lambda e: choice[e], reverse=True)[:K]
        gates = {e: z[e] for e in chosen}
        if c.norm_topk_prob:
            s = sum(gates.values())
            gates = {e: v / s for e, v in gates.items()}
        if not (c.scale_only_if_unnormalized and c.norm_topk_prob):
            gates = {e: v * c.routed_scaling_factor for e, v in gates.items()}
        out.append(gates)
    return out


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_matches_brute_force(name):
    cfg = make_config(BASE | ROUTERS[name])
    router = Router(cfg)
    router.reset_parameters(0.5)
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(64, 32)
    r = router(x)
    ref = brute_force_route(x, router.weight, router.e_score_correction_bias, cfg)
    for t in range(64):
        got = dict(zip(r.indices[t].tolist(), r.weights[t].tolist(), strict=True))
        assert set(got) == set(ref[t]), f"token {t}"
        for e in got:
            assert got[e] == pytest.approx(ref[t][e], rel=1e-5, abs=1e-7)
        if cfg.topk_method != "greedy":  # selection spans at most topk_group groups
            assert len({e // (16 // cfg.n_group) for e in got}) <= cfg.topk_group
        if cfg.norm_topk_prob and not cfg.scale_only_if_unnormalized:
            assert sum(got.values()) == pytest.approx(cfg.routed_scaling_factor, rel=1e-5)


def test_huge_bias_forces_selection_but_not_the_gate():
    cfg = make_config(BASE | ROUTERS["sigmoid_noaux_tc"] | dict(norm_topk_prob=False, routed_scaling_factor=1.0))
    router = Router(cfg)
    router.reset_parameters(0.5)
    router.e_score_correction_bias[5] = 1e3
    x = torch.randn(128, 32)
    r = router(x)
    assert (r.indices == 5).any(dim=1).all()
    pos = (r.indices == 5).int().argmax(dim=1)
    gate5 = r.weights.gather(1, pos[:, None]).squeeze(1)
    torch.testing.assert_close(gate5, torch.sigmoid(x @ router.weight[5]))  # the UNBIASED score


def test_bias_is_fp32_buffer_without_grad_and_survives_casts():
    cfg = make_config(BASE | ROUTERS["sigmoid_noaux_tc"])
    model = DeepSeekForCausalLM.from_config(cfg, seed=0)
    gate = model.model.layers[0].mlp.gate
    gate.e_score_correction_bias.fill_(1.0 + 1e-4)    # not representable in bf16
    model = model.to(torch.bfloat16)
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and not bias.requires_grad
    assert bias[0].item() == pytest.approx(1.0 + 1e-4, abs=1e-7)
    assert "model.layers.0.mlp.gate.e_score_correction_bias" in model.state_dict()
    assert all("e_score_correction_bias" not in n for n, _ in model.named_parameters())
    out = model(torch.randint(0, 64, (1, 5))).logits  # bf16 forward works with the fp32 router
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def per_token_experts(x, idx, gates, experts):
    """Oracle: every token through each of its experts, one at a time."""
    I = experts.inner
    out = torch.zeros_like(x)
    for t, k in itertools.product(range(x.shape[0]), range(idx.shape[1])):
        e = int(idx[t, k])
        w_gate, w_up = experts.gate_up_proj[e, :I], experts.gate_up_proj[e, I:]
        h = F.silu(x[t] @ w_gate.T) * (x[t] @ w_up.T)
        out[t] = out[t] + gates[t, k] * (h @ experts.down_proj[e].T)
    return out


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "padded_bmm", "fused"])
def test_expert_kernels_match_per_token_loop_with_gradients(impl):
    cfg = make_config(BASE | {"expert_impl": impl})
    experts = RoutedExperts(cfg)
    experts.reset_parameters(0.3)
    x = torch.randn(40, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(12)[:4] for _ in range(40)])  # experts 12..15 get no tokens
    gates = torch.rand(40, 4, requires_grad=True)
    got = experts(x, idx, gates)
    ref = per_token_experts(x, idx, gates, experts)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, gates, experts.gate_up_proj, experts.down_proj), g)
    ref_grads = torch.autograd.grad(ref, (x, gates, experts.gate_up_proj, experts.down_proj), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[2][12:].abs().sum() == 0  # unused experts get zero gradient


@pytest.mark.parametrize("op", ["private", "missing"])
@pytest.mark.parametrize("impl", ["grouped_mm", "fused"])
def test_grouped_kernels_on_torch_with_only_the_private_op_or_none(monkeypatch, impl, op):
    from moelab.model import experts as ex

    if op == "private" and (not hasattr(torch, "_grouped_mm") or ex.grouped_mm_missing(torch.device("cpu"),
                                                                                      torch.float32)):
        pytest.skip("this torch's _grouped_mm does not run on the CPU (torch 2.8-2.10: CUDA only)")
    monkeypatch.setattr(ex, "_probed", {})
    calls = []

    def private(*args, **kw):
        calls.append(1)
        return torch._grouped_mm(*args, **kw)

    monkeypatch.setattr("moelab.model.experts.grouped_mm", private if op == "private" else None)
    test_expert_kernels_match_per_token_loop_with_gradients(impl)     # same outputs and gradients
    assert (len(calls) > 0) == (op == "private")                      # missing: loop / padded bmm instead


@pytest.mark.parametrize("n_tokens", [1, 3])
@torch.no_grad()
def test_few_token_decode_path_matches_per_token_loop(n_tokens):
    """N·K < E without autograd (decoding) takes the gathered-weights path; a repeated expert in a
    row and the same expert across tokens must both work."""
    experts = RoutedExperts(make_config(BASE | {"expert_impl": "fused"}))
    experts.reset_parameters(0.3)
    x = torch.randn(n_tokens, 32)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(n_tokens)])
    idx[-1, 0] = idx[0, 1]                       # the same expert for two tokens
    gates = torch.rand(n_tokens, 4)
    assert idx.numel() < experts.n_experts
    torch.testing.assert_close(experts(x, idx, gates), per_token_experts(x, idx, gates, experts), atol=1e-5, rtol=1e-5)


def test_one_shared_mlp_of_width_2i_equals_two_split_experts():
    wide = SwiGLU(32, 16)
    a, b = SwiGLU(32, 8), SwiGLU(32, 8)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            getattr(a, name).weight.copy_(getattr(wide, name).weight[:8])
            getattr(b, name).weight.copy_(getattr(wide, name).weight[8:])
        a.down_proj.weight.copy_(wide.down_proj.weight[:, :8])
        b.down_proj.weight.copy_(wide.down_proj.weight[:, 8:])
    x = torch.randn(5, 32)
    torch.testing.assert_close(wide(x), a(x) + b(x), atol=1e-6, rtol=1e-5)


def test_moe_layer_is_shared_plus_gated_routed():
    cfg = make_config(BASE | ROUTERS["sigmoid_noaux_tc"])
    moe = DeepSeekMoE(cfg, 0)
    moe.gate.reset_parameters(0.3)
    moe.experts.reset_parameters(0.3)
    seen = []
    moe.routing_observers.append(lambda m, r: seen.append(r))
    x = torch.randn(2, 7, 32)
    y = moe(x)
    r = seen[0]
    ref = (per_token_experts(x.reshape(14, 32), r.indices, r.weights, moe.experts)
           + moe.shared_experts(x.reshape(14, 32)))
    torch.testing.assert_close(y.reshape(14, 32), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,freq,expected", [(0, 1, [0, 1, 2, 3, 4, 5]), (2, 1, [2, 3, 4, 5]), (1, 2, [2, 4])])
def test_dense_and_moe_layer_placement(k, freq, expected):
    cfg = make_config(BASE | dict(num_hidden_layers=6, first_k_dense_replace=k, moe_layer_freq=freq))
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    moe = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, DeepSeekMoE)]
    assert moe == expected == cfg.moe_layer_ids
    assert all(isinstance(model.model.layers[i].mlp, SwiGLU) for i in range(6) if i not in expected)


def test_active_parameter_identity_deepseekmoe_2b_shape():
    # 1 shared + 7 routed experts at 1/4 FFN width = 2 FFNs' worth of activated expert parameters
    from moelab.model.accounting import model_budget

    cfg = make_config(BASE | dict(n_routed_experts=63, n_shared_experts=1, num_experts_per_tok=7,
                                  moe_intermediate_size=16, intermediate_size=64, topk_method="greedy",
                                  scoring_func="softmax", norm_topk_prob=False))
    b = model_budget(cfg)
    ffn = 3 * 32 * 64
    shared = 3 * 32 * 16
    per_layer_active = b.activated_routed_expert_params // cfg.num_hidden_layers + shared
    assert per_layer_active == 2 * ffn


def test_hub_v2_rule_does_not_renormalise_a_single_expert():
    cfg = make_config(BASE | dict(scoring_func="softmax", topk_method="greedy", num_experts_per_tok=1,
                                  norm_topk_prob=True, routed_scaling_factor=16.0, scale_only_if_unnormalized=True))
    router = Router(cfg)
    router.reset_parameters(0.5)
    r = router(torch.randn(8, 32))
    torch.testing.assert_close(r.weights[:, 0], r.scores.amax(dim=-1) * 16.0)


def test_router_weight_and_logits_stay_fp32_under_bf16():
    cfg = make_config(BASE | ROUTERS["sigmoid_noaux_tc"])
    model = DeepSeekForCausalLM.from_config(cfg, seed=0, dtype=torch.bfloat16)
    gate = model.model.layers[0].mlp.gate
    assert gate.weight.dtype == torch.float32
    seen = []
    model.model.layers[0].mlp.routing_observers.append(lambda m, r: seen.append(r))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (1, 6)))
    assert seen[0].logits.dtype == torch.float32


def test_padded_swiglu_backward_passes_gradcheck():
    from moelab.model.experts import PaddedSwiGLU

    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    w_gu = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    w_d = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PaddedSwiGLU.apply, (x, w_gu, w_d))


def test_expert_kernels_agree_in_bf16():
    cfg = make_config(BASE)
    ref = RoutedExperts(cfg)
    ref.reset_parameters(0.3)
    x = torch.randn(64, 32)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(64)])
    gates = torch.rand(64, 4)
    want = ref(x, idx, gates)
    for impl in ("grouped_mm", "padded_bmm", "fused"):
        m = RoutedExperts(make_config(BASE | {"expert_impl": impl}))
        m.load_state_dict(ref.state_dict())
        got = m.to(torch.bfloat16)(x.bfloat16(), idx, gates)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


@pytest.mark.slow
def test_compiled_fused_kernel_matches_the_loop():
    cfg = make_config(BASE | {"expert_impl": "loop"})
    ref = RoutedExperts(cfg)
    ref.reset_parameters(0.3)
    fused = RoutedExperts(make_config(BASE | {"expert_impl": "fused", "compile_experts": True}))
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(48, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(48)])
    gates = torch.rand(48, 4, requires_grad=True)
    g = torch.randn(48, 32)
    outs = []
    for m in (ref, fused):
        y = m(x, idx, gates)
        grads = torch.autograd.grad(y, (x, gates, m.gate_up_proj, m.down_proj), g)
        outs.append((y, *grads))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["grouped_mm", "fused"])
def test_grouped_kernels_under_cpu_autocast(impl):
    """Under CPU autocast the grouped kernels compute in bf16 over 16-row-aligned groups; results and
    gradient dtypes must still be right."""
    cfg = make_config(BASE | {"expert_impl": impl})
    ref = RoutedExperts(make_config(BASE | {"expert_impl": "loop"}))
    ref.reset_parameters(0.3)
    m = RoutedExperts(cfg)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(64, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(64)])
    gates = torch.rand(64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x, idx, gates)
        want = ref(x, idx, gates)
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)
    got.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.gate_up_proj.grad.dtype == torch.float32


@pytest.mark.parametrize("align", [1, 16])
def test_aligned_plan_adds_zero_gate_slots_and_changes_nothing(align):
    """Groups rounded up to ``align`` rows (bf16 on the CPU): padding slots read token 0 with gate 0,
    so output and every gradient equal the per-token loop, through both grouped kernels."""
    from moelab.model.experts import FusedGroupedExperts, dispatch, permute, unpermute

    experts = RoutedExperts(make_config(BASE | {"expert_impl": "grouped_mm"}))
    experts.reset_parameters(0.3)
    x = torch.randn(40, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(12)[:4] for _ in range(40)])  # experts 12..15 get no tokens
    gates = torch.rand(40, 4, requires_grad=True)
    plan = permute(idx, gates, 16, align=align)
    assert torch.equal(plan.counts, torch.bincount(idx.flatten(), minlength=16))
    assert (plan.rows % align == 0).all() and (plan.rows >= plan.counts).all()
    assert (plan.rows - plan.counts < align).all() and int(plan.rows[12:].sum()) == 0
    n_pad = int((plan.rows - plan.counts).sum())
    assert int((plan.gate == 0).sum()) >= n_pad and plan.token.numel() == idx.numel() + n_pad
    params = (x, gates, experts.gate_up_proj, experts.down_proj)
    ref = per_token_experts(x, idx, gates, experts)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g)
    offs = torch.cumsum(plan.rows, 0).to(torch.int32)
    for got in (unpermute(experts._grouped(dispatch(x, plan), plan.rows), plan, 40),
                FusedGroupedExperts.apply(x, plan.token, plan.inverse, plan.gate, offs, experts.gate_up_proj,
                                          experts.down_proj)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(got, params, g, retain_graph=True), ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
