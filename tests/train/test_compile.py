"""``train.compile``: whole decoder blocks (``true``) or their dense parts (``"dense"``) through
``torch.compile`` — what gets compiled, one graph per block kind, activation checkpointing inside, and
training to the eager losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import TINY_MOE
from torch._dynamo.utils import counters

from moelab.config import make_config
from moelab.errors import TrainingError
from moelab.model import experts
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.train.balance import Balancer
from moelab.train.checkpointing import enable_activation_checkpointing
from moelab.train.compile import compile_dense_parts, compile_model
from moelab.train.config import BalanceConfig, RunConfig
from moelab.train.loop import train

MODEL = TINY_MOE                      # tests/support/tiny.py


def run_config(data_dir: Path, **train_kw) -> RunConfig:
    t = dict(steps=2, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, eval_every=2, eval_batches=2,
             ckpt_every=2, dtype="float32", seed=0) | train_kw
    return RunConfig(model=make_config(MODEL), data={"path": str(data_dir), "seq_len": 32}, train=t)


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _moe_model(**kw):
    return DeepSeekForCausalLM.from_config(make_config(MODEL | kw), seed=0)


def test_compile_covers_the_dense_parts_only_and_needs_a_compiler(monkeypatch):
    model = DeepSeekForCausalLM.from_config(make_config(MODEL | {"first_k_dense_replace": 1}), seed=0)
    assert compile_dense_parts(model) == 1 + 2 * 3 + 2          # final norm; 3 per block; dense MLP, shared
    compiled = {n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {"model.norm", "model.layers.0.mlp", "model.layers.1.mlp.shared_experts"} | {
        f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn", "input_layernorm", "post_attention_layernorm")}
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(TrainingError, match="C\\+\\+ compiler"):
        compile_dense_parts(DeepSeekForCausalLM.from_config(make_config(MODEL), seed=0))


def test_compile_true_compiles_whole_blocks_and_the_final_norm():
    model = DeepSeekForCausalLM.from_config(make_config(MODEL | {"first_k_dense_replace": 1}), seed=0)
    assert compile_model(model, True) == 1 + 2
    compiled = {n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {"model.norm", "model.layers.0", "model.layers.1"}
    assert compile_model(DeepSeekForCausalLM.from_config(make_config(MODEL), seed=0), False) == 0


def _compiled_steps(model, bal, steps=2):
    """Train-mode forward + backward under bf16 autocast; returns the last step's gradients and loads."""
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
        logits.float().logsumexp(-1).mean().backward()
        loads = bal.counts
        bal.step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loads


def test_compiled_blocks_share_one_graph_per_kind_with_the_balancer(monkeypatch):
    """Whole blocks compile once per kind (dense, MoE), not once per layer: the balancer's counting runs
    inside the graph and must not specialise it per layer (past dynamo's recompile limit of 8 the
    remaining layers would silently run eagerly)."""
    monkeypatch.setattr(experts, "LOWP_CPU_ALIGN", 1)               # CUDA's grouping: one graph per block
    model = _moe_model(num_hidden_layers=10, first_k_dense_replace=1).train()
    bal = Balancer(model, BalanceConfig(method="loss_free", bias_update_rate=1e-3))
    torch._dynamo.reset()
    counters.clear()
    compile_model(model, True, backend="eager")
    _compiled_steps(model, bal)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])    # final norm, dense, MoE block
    assert not counters["graph_break"]
    assert all(m.gate.e_score_correction_bias.abs().sum() > 0 for m in bal.layers)   # counted and updated


def test_compiled_checkpointed_blocks_give_the_eager_gradients(monkeypatch):
    """Activation checkpointing around compiled blocks (bf16 autocast, CUDA's grouping, so the whole block
    traces): no graph break, the gradients and the balancer's loads of the eager checkpointed model (the
    recomputation is not counted twice)."""
    monkeypatch.setattr(experts, "LOWP_CPU_ALIGN", 1)
    runs = []
    for compiled in (False, True):
        model = _moe_model(first_k_dense_replace=1).train()
        bal = Balancer(model, BalanceConfig(method="loss_free", bias_update_rate=0.0))
        enable_activation_checkpointing(model)
        torch._dynamo.reset()
        counters.clear()
        if compiled:
            compile_model(model, True, backend="aot_eager")
        grads, loads = _compiled_steps(model, bal, steps=1)
        with bal.measure(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.eval()(torch.randint(0, 320, (1, 16)))
        runs.append((grads, loads, bal.eval_counts.sum()))
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] >= 2
    (g0, l0, e0), (g1, l1, e1) = runs
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=2e-2, atol=2e-3)
    assert torch.equal(l0, l1) and l0.sum() > 0 and e0 == e1 > 0


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("how, extra", [(True, {}), ("dense", {}), ("blocks", {"activation_checkpointing": True})],
                         ids=["blocks", "dense", "blocks+checkpointing"])
def test_compiled_training_matches_eager(excerpt_tokens, tmp_path, how, extra):
    kw = dict(steps=2, eval_every=2, ckpt_every=2)   # ~45 s with a cold inductor cache: compiling train + eval
    train(run_config(excerpt_tokens, **kw), tmp_path / "eager", progress=False)
    train(run_config(excerpt_tokens, compile=how, **extra, **kw), tmp_path / "compiled", progress=False)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for s in eager:
        assert compiled[s] == pytest.approx(eager[s], rel=1e-4)
