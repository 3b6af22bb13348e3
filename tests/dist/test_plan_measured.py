"""The planner's memory model against a real training step on this CPU (one rank: dp = ep = 1).

Measured: every allocation and free of torch's CPU allocator during a steady-state step (forward, loss,
backward, fused AdamW step, ``zero_grad(set_to_none=True)``, as moelab.train.step runs it), recorded by
torch.profiler; the live bytes at the end of the forward (what autograd saved) and the peak of the step,
on top of the parameters and AdamW states counted by numel. Under bf16 autocast the saved tensors are
summed by storage through ``saved_tensors_hooks``.

Attention kernels as the CPU picks them: MLA (query/key head 48 ≠ value head 32) runs SDPA's math
path, MHA its fused CPU flash kernel; the plan is told which (``attention=``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from alloc_trace import live_bytes

from moelab.config import load_model_config, make_config
from moelab.dist.plan import Mesh, plan
from moelab.lm.nll import lm_loss
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.train.checkpointing import enable_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY = load_model_config(ROOT / "configs" / "tiny.toml")
VARIANTS = {
    "mla-moe": ({}, "math", "fused"),
    "mha-moe": ({"use_mla": False}, "fused", "fused"),
    "mla-moe-grouped": ({"expert_impl": "grouped_mm"}, "math", "grouped"),
    "mla-dense": ({"n_routed_experts": None, "first_k_dense_replace": 0}, "math", "fused"),
}
TOLERANCE = 0.15


def _config(name: str):
    changes, attention, experts = VARIANTS[name]
    return make_config({**TINY.model_dump(exclude_none=True), **changes}), attention, experts


def measure_step(cfg, batch: int, seq_len: int, checkpointing: bool) -> dict[str, int]:
    model = DeepSeekForCausalLM.from_config(cfg, seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))

    def step():
        with record_function("forward"):
            logits = model(x).logits
            loss = lm_loss(logits, x)
            del logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()                                    # the optimizer's states exist from here on: a steady-state step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak, at_forward_end = live_bytes(prof)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
    return {"state": state, "saved": at_forward_end, "step_peak": peak,
            "grads": sum(p.numel() * p.element_size() for p in model.parameters())}


@pytest.mark.parametrize("name, batch, seq_len, checkpointing", [
    ("mla-moe", 4, 256, False), ("mla-moe", 4, 256, True),
    ("mha-moe", 2, 128, False), ("mha-moe", 2, 128, True),
    ("mla-moe-grouped", 2, 256, False), ("mla-dense", 4, 256, True),
])
def test_plan_matches_a_measured_training_step(name, batch, seq_len, checkpointing):
    cfg, attention, experts = _config(name)
    got = measure_step(cfg, batch, seq_len, checkpointing)
    p = plan(cfg, Mesh(dp=1), seq_len, batch, precision="fp32", attention=attention, expert_kernel=experts)
    # parameters, gradients, AdamW moments: exact (the step tensors are 0-dim and not counted)
    assert p.weights_bytes + p.optimizer_bytes == got["state"]
    assert p.grads_bytes == got["grads"]
    saved = p.act_saved_ckpt_bytes if checkpointing else p.act_saved_bytes
    peak_acts = p.act_peak_ckpt_bytes if checkpointing else p.act_peak_bytes
    total = p.peak_ckpt_bytes if checkpointing else p.peak_bytes
    assert saved == pytest.approx(got["saved"], rel=TOLERANCE)
    assert peak_acts == pytest.approx(got["step_peak"], rel=TOLERANCE)          # activations + gradients
    assert total == pytest.approx(got["state"] + got["step_peak"], rel=TOLERANCE)


def test_bf16_mixed_saved_tensors():
    """Under bf16 autocast: the planner's saved activations plus the bf16 weight casts autocast keeps for the
    backward, against the storages autograd saves (the math attention runs in fp32 on the CPU)."""
    cfg, attention, experts = _config("mla-moe")
    model = DeepSeekForCausalLM.from_config(cfg, seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (4, 256))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        lm_loss(logits, x)
    p = plan(cfg, Mesh(dp=1), 256, 4, precision="bf16-mixed", attention=attention, expert_kernel=experts)
    # grouped GEMMs on the CPU pad each expert's rows to 16 in bf16 (experts.LOWP_CPU_ALIGN): a little more
    assert p.act_saved_bytes + p.working_weights_bytes == pytest.approx(sum(storages.values()), rel=0.05)
