"""PeriodicLoRA (docs/methods.md §6): stage ends are function-preserving, the accumulated update exceeds
rank r (but not k·r after k stages), the optimizer state of the LoRA tensors is reset, memory is flat,
and the [UNCERTAIN] momentum rule does what the third-party code does."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moelab.config import make_config
from moelab.errors import CheckpointError, ConfigError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.lora import LoraSettings, apply_lora, lora_parameters, merge_and_reinit
from moelab.tune.plora import PeriodicLoRA, PLoraSettings

R = 2
MODEL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
             scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, initializer_range=0.1,
             max_position_embeddings=128)


def _model_cfg(dtype):
    return MODEL | {"expert_impl": "loop"} if dtype == torch.float64 else MODEL   # grouped_mm has no fp64


def setup(stage_steps: int = 2, lr: float = 1e-2, dtype=torch.float32, **plora):
    model = DeepSeekForCausalLM.from_config(make_config(_model_cfg(dtype)), seed=0, dtype=dtype)
    apply_lora(model, LoraSettings(r=R, alpha=4))
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr)
    return model, opt, PeriodicLoRA(model, PLoraSettings(stage_steps=stage_steps, **plora))


def train_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (4, 17), generator=g)
    logits = model(ids[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def logits(model):
    with torch.no_grad():
        return model(torch.arange(20)[None] % 96).logits


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_stage_end_is_function_preserving_and_resets_adam(dtype, tol):
    """fp32: equal up to rounding (the fold reorders the sums); fp64 shows the identity is exact."""
    model, opt, pl = setup(stage_steps=2, dtype=dtype)
    params = lora_parameters(model)
    ids_before = [id(p) for p in params]
    o_proj = model.model.layers[1].self_attn.o_proj
    base = logits(model)                                                   # B = 0: the base model
    for step in range(1, 5):
        train_step(model, opt, step)
        boundary = step % 2 == 0
        if boundary:
            before = logits(model)
            A_before = o_proj.lora_A["weight"].detach().clone()
        assert pl.after_step(step, opt) == boundary
        if not boundary:
            assert all(len(opt.state[p]) > 0 for p in params)            # Adam state builds up within a stage
            continue
        assert (before - base).abs().max() > 1e-3                          # LoRA has moved the function
        torch.testing.assert_close(logits(model), before, atol=tol, rtol=tol)
        assert all(float(p.detach().abs().max()) == 0 for _, p in _bs(model))   # B zeroed
        assert not torch.equal(o_proj.lora_A["weight"], A_before)           # A redrawn
        for p in params:                                                     # fresh Adam: no moments
            st = opt.state.get(p, {})
            assert not st or all(float(v.abs().max()) == 0 for k, v in st.items() if k != "step")
    assert [id(p) for p in lora_parameters(model)] == ids_before          # same tensors: optimizer still valid
    assert pl.stages_done == 2
    train_step(model, opt, 99)                                            # and it steps from fresh state
    assert all(int(opt.state[p]["step"]) == 1 for p in params)


def _bs(model):
    return [(n, p) for n, p in model.named_parameters() if ".lora_B." in n]


def test_keeping_optimizer_state_when_asked():
    model, opt, pl = setup(stage_steps=1, reset_optimizer=False)
    train_step(model, opt, 1)
    assert pl.after_step(1, opt)
    assert all(float(opt.state[p]["exp_avg_sq"].abs().max()) > 0 for _, p in _bs(model))   # B had gradients
    assert all(int(opt.state[p]["step"]) == 1 for p in lora_parameters(model))


def test_accumulated_update_exceeds_rank_r_but_not_k_r():
    k = 4
    model, opt, pl = setup(stage_steps=2, lr=2e-2)
    lin = {n: m for n, m in model.named_modules() if n.endswith(("self_attn.o_proj", "self_attn.kv_b_proj",
                                                                 "mlp.shared_experts.down_proj"))}
    w0 = {n: m._parameters["weight"].detach().clone().double() for n, m in lin.items()}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = 0
    for _stage in range(k):
        for _ in range(2):
            step += 1
            train_step(model, opt, step)
            pl.after_step(step, opt)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_trainable   # flat memory
    assert pl.stages_done == k
    for n, m in lin.items():
        delta = m._parameters["weight"].detach().double() - w0[n]
        s = torch.linalg.svdvals(delta)
        rank = int((s > 1e-4 * s[0]).sum())            # far above fp32 rounding of the folds (~1e-7)
        assert R < rank <= k * R, (n, rank, s[: k * R + 2])


def test_merge_and_reinit_keeps_objects_and_function_for_experts():
    model, opt, pl = setup()
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    experts = model.model.layers[1].mlp.experts
    before_eff = experts.gate_up_proj.detach().clone()
    objs = [id(p) for p in lora_parameters(model)]
    y0 = logits(model)
    merge_and_reinit(model)
    torch.testing.assert_close(experts._parameters["gate_up_proj"], before_eff, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), y0, atol=1e-6, rtol=0)
    assert [id(p) for p in lora_parameters(model)] == objs


def test_momentum_unload_follows_the_third_party_rule():
    m = 0.1
    model, opt, pl = setup(stage_steps=5, unload="momentum", momentum=m)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    lin = model.model.layers[0].self_attn.o_proj
    ex = model.model.layers[1].mlp.experts
    s = lin.lora_slots["weight"].scaling
    W0, A0, B0 = (lin._parameters["weight"].detach().clone(), lin.lora_A["weight"].detach().clone(),
                  lin.lora_B["weight"].detach().clone())
    eff0 = lin.weight.detach().clone()
    G0, dG = ex._parameters["gate_up_proj"].detach().clone(), ex._lora_delta("gate_up_proj").detach().clone()
    train_state = {p: dict(v) for p, v in opt.state.items()}
    assert pl.after_step(1, opt) is False
    torch.testing.assert_close(lin._parameters["weight"], W0 + m * s * B0 @ A0, atol=1e-6, rtol=0)
    torch.testing.assert_close(lin.lora_A["weight"], (1 - m) * A0, atol=0, rtol=0)
    torch.testing.assert_close(lin.lora_B["weight"], (1 - m) * B0, atol=0, rtol=0)
    # not function-preserving: the effective weight moves by -m(1-m)·s·BA
    torch.testing.assert_close(lin.weight - eff0, -m * (1 - m) * s * B0 @ A0, atol=1e-6, rtol=0)
    torch.testing.assert_close(ex._parameters["gate_up_proj"], G0 + m * dG, atol=1e-6, rtol=0)
    assert {p: dict(v) for p, v in opt.state.items()} == train_state       # optimizer state kept
    for step in range(2, 6):
        assert pl.after_step(step, opt) == (step == 5)
    assert pl.stages_done == 1


def test_schedule_step_restarts_or_continues():
    _, _, restart = setup(stage_steps=4)
    assert [restart.schedule_step(s) for s in range(10)] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    _, _, cont = setup(stage_steps=4, lr_schedule="continue")
    assert [cont.schedule_step(s) for s in range(6)] == list(range(6))


def test_state_round_trip_and_errors():
    model, opt, pl = setup(stage_steps=1)
    train_step(model, opt, 1)
    pl.after_step(1, opt)
    pl.after_step(2, opt)
    state = pl.state_dict()
    assert state == {"stages_done": 2, "last_step": 2}
    other = PeriodicLoRA(model, PLoraSettings(stage_steps=1))
    other.load_state_dict(dict(state))
    assert other.stages_done == 2
    with pytest.raises(CheckpointError, match="stages_done"):
        other.load_state_dict({"stages_done": "x"})
    plain = DeepSeekForCausalLM.from_config(make_config(MODEL), seed=0)
    with pytest.raises(ConfigError, match="apply_lora"):
        PeriodicLoRA(plain, PLoraSettings())


@pytest.mark.parametrize("bad", [dict(stage_steps=0), dict(momentum=1.0), dict(momentum=0.0),
                                 dict(unload="discard"), dict(lr_schedule="cosine"), dict(stages=3)])
def test_settings_are_validated(bad):
    with pytest.raises(ValidationError):
        PLoraSettings(**bad)
