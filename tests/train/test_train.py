"""The training loop and load balancing (docs/methods.md §3 checks, exact resume, failure handling).

Toy sizes: a 2-layer model with 8 experts on a few thousand tokens of Shakespeare, a few seconds each.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY_MOE

from moelab.config import make_config
from moelab.errors import ConfigError, TrainingError
from moelab.model.moe import DeepSeekMoE
from moelab.train.balance import Balancer, expert_balance_loss, maxvio
from moelab.train.config import BalanceConfig, RunConfig, load_run_config
from moelab.train.loop import train

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"

MODEL = TINY_MOE                      # tests/support/tiny.py


@pytest.fixture(scope="module")
def data_dir(excerpt_tokens) -> Path:
    return excerpt_tokens            # conftest.py: the Shakespeare excerpt as a token directory


def run_config(data_dir: Path, **train_kw) -> RunConfig:
    t = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3, eval_batches=2,
             ckpt_every=3, keep_last=5, dtype="float32", seed=0)
    t.update(train_kw)
    balance = t.pop("balance", {})
    return RunConfig(model=make_config(MODEL), data={"path": str(data_dir), "seq_len": 32}, train=t,
                     balance=balance)


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


# ------------------------------------------------------------------------------------------------
# MaxVio and auxiliary losses: hand-computed values
# ------------------------------------------------------------------------------------------------
def test_maxvio_on_hand_computed_loads():
    assert float(maxvio(torch.tensor([3.0, 1, 1, 1]))) == pytest.approx(1.0)
    assert float(maxvio(torch.tensor([2.0, 2, 2, 2]))) == 0.0
    assert maxvio(torch.tensor([[4.0, 0, 0, 0], [1, 1, 1, 1]])).tolist() == pytest.approx([3.0, 0.0])


def test_perfectly_balanced_softmax_router_gives_alpha():
    E, N = 4, 8
    scores = torch.full((N, E), 1 / E)                          # uniform softmax scores
    idx = torch.tensor([[0, 1], [2, 3]] * 4)                    # every expert chosen equally often
    assert float(expert_balance_loss(scores, idx, E)) == pytest.approx(1.0)   # × α = α
    skewed = torch.tensor([[0, 1]] * N)
    s = torch.tensor([[0.4, 0.4, 0.1, 0.1]]).expand(N, E)
    # f = [2, 2, 0, 0] (E/(K·N)·count), P = [.4, .4, .1, .1] -> 1.6
    assert float(expert_balance_loss(s, skewed, E)) == pytest.approx(1.6)


# ------------------------------------------------------------------------------------------------
# the loss-free bias
# ------------------------------------------------------------------------------------------------
def _moe_model(**kw):
    from moelab.model.transformer import DeepSeekForCausalLM

    return DeepSeekForCausalLM.from_config(make_config(MODEL | kw), seed=0)


def test_one_update_moves_each_expert_by_exactly_u_from_summed_micro_batches():
    model = _moe_model()
    bal = Balancer(model, BalanceConfig(method="loss_free", bias_update_rate=1e-3))
    model.train()
    layer = bal.layers[0]
    before = layer.gate.e_score_correction_bias.clone()
    seen = []
    layer.routing_observers.append(lambda m, r: seen.append(r.indices.clone()))
    for _ in range(4):                                           # four micro-batches, one optimizer step
        model(torch.randint(0, 320, (2, 16)))
    counts = torch.bincount(torch.cat(seen).flatten(), minlength=8).double()
    bal.step()
    delta = layer.gate.e_score_correction_bias - before
    expected = 1e-3 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(delta.double(), expected, atol=1e-9, rtol=0)
    assert all(v == 0 or abs(v - 1e-3) < 1e-9 for v in delta.abs().tolist())


def test_eval_forwards_do_not_count_and_zero_rate_keeps_bias_bit_identical():
    model = _moe_model()
    bal = Balancer(model, BalanceConfig(method="loss_free", bias_update_rate=0.0))
    for layer in bal.layers:
        layer.gate.e_score_correction_bias.normal_(0, 0.1)
    before = [layer.gate.e_score_correction_bias.clone() for layer in bal.layers]
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 320, (2, 16)))
    assert bal.counts.sum() == 0                                 # eval never feeds the bias
    model.train()
    model(torch.randint(0, 320, (2, 16)))
    assert bal.counts.sum() == 2 * 16 * 2 * 2                    # tokens × K × layers
    bal.step()
    for b, layer in zip(before, bal.layers, strict=True):
        assert torch.equal(b, layer.gate.e_score_correction_bias)


def test_recentring_changes_the_bias_but_not_the_assignments():
    torch.manual_seed(0)
    a, b = _moe_model(), _moe_model()
    bal_a = Balancer(a, BalanceConfig(method="loss_free", bias_update_rate=1e-2, bias_recenter=False))
    bal_b = Balancer(b, BalanceConfig(method="loss_free", bias_update_rate=1e-2, bias_recenter=True))
    a.train(), b.train()
    for _ in range(5):
        x = torch.randint(0, 320, (2, 16))
        with torch.no_grad():
            a(x), b(x)
        bal_a.step(), bal_b.step()
    ba, bb = bal_a.layers[0].gate.e_score_correction_bias, bal_b.layers[0].gate.e_score_correction_bias
    assert abs(float(bb.mean())) < 1e-6 and not torch.allclose(ba, bb)
    x = torch.randn(64, 32)
    assert torch.equal(bal_a.layers[0].gate(x).indices.sort(1).values, bal_b.layers[0].gate(x).indices.sort(1).values)


def test_one_balancer_per_model_counting_into_per_layer_buffers():
    model = _moe_model()
    bal = Balancer(model, BalanceConfig())
    assert all(m.balance_load.shape == (2, 8) and "balance_load" not in m.state_dict() for m in bal.layers)
    with pytest.raises(RuntimeError, match="already has a Balancer"):
        Balancer(model, BalanceConfig())
    bal.detach()
    assert not any(hasattr(m, "balance_load") for m in bal.layers)
    Balancer(model, BalanceConfig())                  # after detach: a new one may attach


def test_loss_free_needs_a_router_with_the_bias():
    model = _moe_model(scoring_func="softmax", topk_method="greedy")
    with pytest.raises(ConfigError, match="noaux_tc"):
        Balancer(model, BalanceConfig(method="loss_free"))


def test_toy_skewed_router_maxvio_falls_5x_within_500_steps():
    """docs/methods.md §3: frozen skewed sigmoid router, 64 experts, top-6, 4096 tokens per batch, u = 1e-3."""
    cfg = make_config(MODEL | dict(hidden_size=16, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=2))
    moe = DeepSeekMoE(cfg, 0).train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(64, 16, generator=gen) * 0.3)
        moe.gate.weight[:8] += 0.5                               # eight experts are favoured by every token
    bal = Balancer(torch.nn.ModuleList([moe]), BalanceConfig(method="loss_free", bias_update_rate=1e-3))
    history = []
    for _ in range(500):
        x = torch.randn(4096, 16, generator=gen) + 0.5
        with torch.no_grad():
            bal._observe(moe, moe.gate(x))                       # routing only; the experts do not matter
        history.append(bal.step()["maxvio_batch"])
    start, end = np.mean(history[:5]), np.mean(history[-20:])
    assert start > 1.0 and end < start / 5, (start, end)


def test_aux_loss_is_added_and_has_gradients_only_through_the_scores():
    model = _moe_model(scoring_func="softmax", topk_method="greedy")
    bal = Balancer(model, BalanceConfig(method="aux_loss", aux_alpha=1e-2))
    model.train()
    model(torch.randint(0, 320, (2, 16)))
    aux = bal.pop_aux_loss()
    assert aux is not None and aux.requires_grad and 0 < float(aux.detach()) < 1
    aux.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert bal.pop_aux_loss() is None


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def test_run_writes_metrics_checkpoints_and_report(data_dir, tmp_path):
    res = train(run_config(data_dir), tmp_path / "run", progress=False)
    assert res.status == "finished" and res.step == 6 and res.tokens == 6 * 4 * 32
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "tokens_per_s", "maxvio_batch"} <= set(train_lines[0])
    assert [r["step"] for r in evals] == [3, 6]
    e = evals[-1]
    assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    assert {"val_bpb", "maxvio_global"} <= set(e)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003", "step-00000006"]
    for f in ("loss.png", "maxvio.png", "expert_load.png", "summary.md"):
        assert (tmp_path / "run" / "report" / f).is_file()
    assert list((tmp_path / "run" / "tb").iterdir())                     # TensorBoard events
    share = np.load(tmp_path / "run" / "expert_load.npy")
    assert share.shape == (2, 8) and np.allclose(share.sum(1), 1)
    import moelab  # the checkpoint is a HF model
    m = moelab.load(tmp_path / "run" / "checkpoints" / "step-00000006" / "model")
    assert (tmp_path / "run" / "checkpoints" / "step-00000006" / "model" / "tokenizer.json").is_file()
    assert m.model.layers[0].mlp.gate.e_score_correction_bias.abs().sum() > 0   # the bias moved and was saved


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_freed_host_memory_unless_switched_off(data_dir, tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr("moelab.train.loop.keep_freed_host_memory", lambda: calls.append(1) or True)
    kw = {} if keep else {"keep_host_memory": False}   # on by default
    train(run_config(data_dir, steps=1, eval_every=1, ckpt_every=1, **kw), tmp_path / "r", progress=False)
    assert len(calls) == (1 if keep else 0)


def test_loss_decreases_on_real_text(data_dir, tmp_path):
    res = train(run_config(data_dir, steps=40, eval_every=40, ckpt_every=40), tmp_path / "r", progress=False)
    losses = train_losses(tmp_path / "r")
    assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 1.0
    assert res.last_eval["val_loss"] < math.log(320)


def test_resume_after_sigint_reproduces_the_uninterrupted_losses(data_dir, tmp_path):
    full = train(run_config(data_dir, balance={"method": "loss_free", "bias_update_rate": 1e-2}), tmp_path / "a",
                 progress=False)
    assert full.status == "finished"

    def interrupt(kind, rec):
        if kind == "log" and rec["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)                 # as if the user pressed Ctrl-C

    cfg = run_config(data_dir, balance={"method": "loss_free", "bias_update_rate": 1e-2})
    part = train(cfg, tmp_path / "b", progress=False, on_event=interrupt)
    assert part.status == "interrupted" and part.step == 4
    assert part.checkpoint.name == "step-00000004"
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, tmp_path / "b", progress=False)              # refuses to overwrite a run
    rest = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert rest.status == "finished" and rest.step == 6
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert b[s] == a[s], (s, a[s], b[s])                    # bit-identical in fp32 on the CPU


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        out = real(*a, **kw)
        return out * float("nan") if calls["n"] == 5 else out   # step 5's training loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    cfg = run_config(data_dir, eval_every=100, ckpt_every=2)
    with pytest.raises(TrainingError, match="step 5") as ei:
        train(cfg, tmp_path / "run", progress=False)
    assert "step-00000004" in str(ei.value)
    import moelab

    moelab.load(tmp_path / "run" / "checkpoints" / "step-00000004" / "model")   # intact


def test_run_config_from_toml_with_overrides_and_errors(data_dir, tmp_path):
    toml = Path("configs/tiny.toml")
    cfg = load_run_config(toml, ["balance.method=aux_loss", "train.lr=3e-4", "data.seq_len=64",
                                 f'data.path="{data_dir}"', "train.steps=5"])
    assert (cfg.balance.method, cfg.train.lr, cfg.data.seq_len, cfg.train.steps) == ("aux_loss", 3e-4, 64, 5)
    assert cfg.data.path == str(data_dir)
    bare = tmp_path / "model_only.toml"
    bare.write_text("[model]\nvocab_size = 320\n")
    with pytest.raises(ConfigError, match=r"no \[train\] section"):
        load_run_config(bare)
    with pytest.raises(ConfigError, match="did you mean 'method'"):
        load_run_config(toml, ["balance.methd=none"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_run_config(toml, ["steps=3"])
    with pytest.raises(ConfigError, match="exactly one of train.steps and train.tokens"):
        load_run_config(toml, ["train.tokens=1000"])


def test_sequence_wise_and_device_level_losses_on_hand_computed_routing():
    from moelab.model.router import Routing
    from moelab.train.balance import device_balance_loss

    E = 4
    # two sequences of two tokens; K = 1. Sequence 0 sends both tokens to expert 0, sequence 1 is balanced.
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.25] * 4])
    idx = torch.tensor([[0], [0], [1], [2]])
    r = Routing(indices=idx, weights=torch.ones(4, 1), scores=scores, logits=scores.log(), batch_shape=(2, 2))
    model = _moe_model()
    bal = Balancer(model, BalanceConfig(method="aux_loss", aux_kind="sequence", aux_alpha=1.0,
                                        seq_aux_indicator="routed"))
    bal.top_k, bal.n_experts = 1, 4
    # seq 0: f = [4, 0, 0, 0], P = [.7, .1, .1, .1] -> 2.8; seq 1: f = [0, 2, 2, 0], P = .25 each -> 1.0
    assert float(bal._sequence_loss(r, scores)) == pytest.approx((2.8 + 1.0) / 2)
    # device level with 2 devices of 2 experts over all 4 tokens: f = [2, 1, 1, 0] -> f' = [1.5, .5];
    # P = [.475, .175, .175, .175] -> P' = [.65, .35]; loss = 1.5·.65 + .5·.35 = 1.15
    assert float(device_balance_loss(scores, idx, E, 2)) == pytest.approx(1.15)


def test_bias_freezes_after_the_token_budget():
    model = _moe_model()
    bal = Balancer(model, BalanceConfig(method="loss_free", bias_update_rate=1e-2, freeze_after_tokens=100))
    model.train()
    bias = bal.layers[0].gate.e_score_correction_bias
    model(torch.randint(0, 320, (2, 16)))
    bal.step(tokens_seen=64)
    moved = bias.clone()
    assert moved.abs().sum() > 0
    model(torch.randint(0, 320, (2, 16)))
    bal.step(tokens_seen=128)                                    # past the budget: u = 0 from now on
    assert torch.equal(bias, moved)
