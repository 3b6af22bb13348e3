"""`moelab finetune grpo` on a tiny MoE: the job's loss on a fixed batch of samples and rewards equals a float64
implementation of the GRPO formula (value and gradient), rewards and advantages by hand, a short run learns a
trivially learnable rule and logs every metric, full / LoRA / ESFT variants and the routing-bias setting,
exact resume inside a sample batch, and clear messages for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import TINY_MOE

import moelab
from moelab.config import make_config
from moelab.data.tokenizer import byte_level_tokenizer, save_tokenizer
from moelab.errors import CheckpointError, ConfigError, DataError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.config import load_finetune_config
from moelab.tune.run import build_job, finetune

pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = ("loss", "reward_mean", "reward_std", "zero_var_groups", "completion_len", "truncated", "kl",
           "clip_fraction", "reward_errors", "reward_timeouts")
ASCII_RULE = """
def ascii_first(completion, row):
    return float(completion[:1].isascii() and completion[:1].isprintable() and completion[:1] != "")

def raises(completion, row):
    if len(completion) % 2:
        raise ValueError("odd")
    return 1.0

def hangs(completion, row):
    import time
    time.sleep(5)
    return 1.0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    save_tokenizer(byte_level_tokenizer(), root)
    base = root / "base"
    moelab.save(DeepSeekForCausalLM.from_config(make_config(TINY_MOE | {"vocab_size": 300}), seed=0), base,
                tokenizer=root)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(5)]
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "experts.json").write_text(json.dumps({"experts": {"0": [1, 2], "1": [3]}}))
    (root / "rules.py").write_text(ASCII_RULE)
    return root


def cfg_for(s: Path, **extra):
    sets = [f"finetune.base={s / 'base'}", f"data.path={s / 'tasks.jsonl'}", "data.seq_len=24",
            "data.val_fraction=0.2", "train.steps=4", "train.batch_size=8", "train.lr=1e-2", "train.dtype=float32",
            "train.device=cpu", "train.eval_every=4", "train.ckpt_every=4", "train.log_every=1",
            "train.eval_batches=2", "train.keep_last=5", f"esft.expert_config={s / 'experts.json'}",
            "grpo.group=4", "grpo.max_new_tokens=6", f"grpo.reward={s / 'rules.py'}:ascii_first"]
    return load_finetune_config(None, sets + [f"{k}={v}" for k, v in extra.items()], method="grpo")


def _logs(run: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _direct_loss(logits, y, old, ref, rewards, G, clip, beta, eps=1e-4):
    """The GRPO loss from the formula, in Python floats (float64), no tensors."""
    B, T = len(y), len(y[0])
    adv = []
    for p in range(B // G):
        r = rewards[p * G:(p + 1) * G]
        m = sum(r) / G
        s = math.sqrt(sum((v - m) ** 2 for v in r) / (G - 1))
        adv += [(v - m) / (s + eps) for v in r]
    total = 0.0
    for i in range(B):
        acc, n = 0.0, 0
        for t in range(T):
            if y[i][t] == -100:
                continue
            row = logits[i][t]
            mx = max(row)
            lp = row[y[i][t]] - mx - math.log(sum(math.exp(v - mx) for v in row))
            o = lp if old is None or math.isnan(old[i][t]) else old[i][t]
            ratio = math.exp(lp - o)
            obj = min(ratio * adv[i], min(max(ratio, 1 - clip), 1 + clip) * adv[i])
            kl = math.exp(ref[i][t] - lp) - (ref[i][t] - lp) - 1
            acc, n = acc + obj - beta * kl, n + 1
        total += acc / max(n, 1)
    return -total / B


def _fixed_batch(data, V=300, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = data.rows
    x = torch.randint(0, V, (R, T), generator=g)
    y = torch.full((R, T), -100)
    for r in range(R):                                   # completions of 1..5 tokens after prompts of 4..8
        start = 3 + r % 5
        y[r, start:start + 1 + r % 5] = torch.randint(0, V, (1 + r % 5,), generator=g)
    ref = torch.where(y != -100, -5.7 + 0.3 * torch.randn(R, T, generator=g, dtype=torch.float64), 0.0)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.3, 0.3, 0.3, 0.3][:R] + [0.0] * max(0, R - 8), dtype=torch.float64)
    logits = (torch.randn(R, T, V, generator=g, dtype=torch.float64) * 0.5)
    return x, y, ref, rewards, logits


@pytest.mark.parametrize("fresh", [True, False])
def test_job_loss_equals_the_formula_in_float64(setup, fresh):
    """data.loss_fn — what train_step calls — on a fixed batch, float64 logits: value and gradient."""
    job, _ = build_job(cfg_for(setup, **{"grpo.clip_eps": 0.1, "grpo.beta": 0.05}))
    data = job.train_data
    x, y, ref, rewards, logits = _fixed_batch(data)
    g = torch.Generator().manual_seed(1)
    old = None if fresh else torch.where(y != -100, -5.7 + 0.4 * torch.randn(y.shape, generator=g, dtype=torch.float64),
                                         0.0)
    data.set_samples(0, x, y, ref, rewards, old=old)
    old_list = None if fresh else data.buf["old"].double().tolist()
    ref_list = data.buf["ref"].double().tolist()
    rows = data.batch(8, 24, 0, 0, 0)
    leaf = logits.clone().requires_grad_(True)
    loss, metrics = data.loss_fn(leaf, rows)
    assert loss.dtype == torch.float64
    args = (y.tolist(), old_list, ref_list, rewards.tolist(), 4, 0.1, 0.05)
    assert float(loss.detach()) == pytest.approx(_direct_loss(logits.tolist(), *args), rel=1e-12, abs=1e-15)
    assert metrics["zero_var_groups"] == 0.5 and metrics["reward_mean"] == pytest.approx(float(rewards.mean()))
    if fresh:         # π_old is this forward, kept for the next steps; its gradient is taken with π_old held
        assert metrics["clip_fraction"] == 0.0 and not torch.isnan(data.buf["old"]).any()
        lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        args = (y.tolist(), torch.where(y != -100, lp, 0.0).tolist(), *args[2:])
    else:
        assert 0 < metrics["clip_fraction"] < 1
    loss.backward()
    for i, t, v in [(0, 3, int(y[0, 3])), (2, 5, 7), (1, 4, int(y[1, 4])), (4, 7, int(y[4, 7]))]:
        vals = logits.clone()
        vals[i, t, v] += 1e-6
        up = _direct_loss(vals.tolist(), *args)
        vals[i, t, v] -= 2e-6
        down = _direct_loss(vals.tolist(), *args)
        assert float(leaf.grad[i, t, v]) == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-9)


def test_rewards_and_advantages_by_hand(setup):
    from moelab.tune.grpo_loss import group_advantages
    from moelab.tune.rewards import make_reward

    score = make_reward("auto", timeout_s=5.0)
    rows = [{"prompt": "2+3=", "completion": "5"}] * 3 + [{"prompt": "add", "tests": "assert add(1, 2) == 3"}] * 3
    add = "def add(a, b):\n    return a + b"
    out = score(["5", " 5. ", "6", add, f"```python\n{add}\n```", add.replace("+", "-")], rows)
    assert out.rewards == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0] and out.errors == out.timeouts == 0
    adv, zero = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4)
    s = math.sqrt(1 / 3)                            # std of (1, 1, 0, 0) with Bessel's correction
    assert adv[:4].tolist() == pytest.approx([0.5 / (s + 1e-4), 0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4)])
    assert adv[4:].tolist() == [0.0] * 4 and zero == 0.5
    raising = make_reward(f"{setup / 'rules.py'}:raises")
    out = raising(["ab", "abc", "a"], [{}] * 3)
    assert out.rewards == [1.0, 0.0, 0.0] and out.errors == 2 and "ValueError: odd" in out.first_problem
    hanging = make_reward(f"{setup / 'rules.py'}:hangs", timeout_s=0.2)
    out = hanging(["x"], [{}])
    assert out.rewards == [0.0] and out.timeouts == 1
    loop = make_reward("unit_tests", timeout_s=1.0)(["while True:\n    pass"], [{"tests": "pass"}])
    assert loop.rewards == [0.0] and loop.timeouts == 1


def _mean_reward(model, data, n=384, seed=123):
    """The rule's mean reward over ``n`` completions of the first training prompt (one seeded draw)."""
    from moelab.infer.sampling import SamplingConfig
    from moelab.tune.grpo_rollout import sample_completions

    roll = sample_completions(model, [data.tasks[0].ids], n, SamplingConfig(temperature=1.0), 6, data.eos, data.pad,
                              seed)
    texts = [data.tokenizer.decode([t for t in c if t != data.eos], skip_special_tokens=True).strip()
             for c in roll.tokens]
    return sum(data.reward(texts, [data.tasks[0].row] * n).rewards) / n


def test_short_run_learns_a_rule_and_logs_every_metric(setup, tmp_path):
    """Reward: the completion starts with a printable ASCII character (~30% of a random model's draws)."""
    cfg = cfg_for(setup, **{"train.steps": 24, "train.batch_size": 16, "grpo.iterations": 2, "grpo.beta": 0.0})
    res, summary = finetune(cfg, tmp_path / "run", progress=False)
    assert res.status == "finished" and summary["method"] == "grpo" and summary["rewards"]["samples"] == 12 * 16
    logs = _logs(tmp_path / "run")
    assert len(logs) == 24 and all(k in r for r in logs for k in METRICS)
    assert all(math.isfinite(r[k]) for r in logs for k in METRICS)
    assert logs[0]["clip_fraction"] == 0.0 and logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == ref
    assert logs[1]["kl"] > 0 and "val_loss" in res.last_eval
    data = build_job(cfg)[0].train_data
    before = _mean_reward(moelab.load(setup / "base"), data)
    after = _mean_reward(moelab.load(tmp_path / "run" / "model"), data)
    assert after > before + 0.08, (before, after)


@pytest.mark.parametrize("train, result", [("lora", "adapter"), ("esft", "esft")])
def test_lora_and_expert_only_variants(setup, tmp_path, train, result):
    res, summary = finetune(cfg_for(setup, **{"grpo.train": train, "train.steps": 2}), tmp_path / "r",
                            progress=False)
    assert res.status == "finished" and (tmp_path / "r" / result).is_dir()
    assert summary["trainable_params"] < summary["total_params"]


@pytest.mark.parametrize("method, moves", [("loss_free", True), ("none", False)])
def test_routing_bias_updates_or_stays(setup, tmp_path, method, moves):
    finetune(cfg_for(setup, **{"train.steps": 2, "balance.method": method}), tmp_path / "r", progress=False)
    key = "model.layers.0.mlp.gate.e_score_correction_bias"
    after = moelab.load(tmp_path / "r" / "model").state_dict()
    before = moelab.load(setup / "base").state_dict()
    name = next(k for k in after if k.endswith("e_score_correction_bias")) if key not in after else key
    assert (not torch.equal(after[name], before[name])) == moves


def test_resume_inside_a_sample_batch_is_exact(setup, tmp_path):
    sets = {"train.steps": 6, "train.ckpt_every": 3, "grpo.iterations": 2}
    whole = tmp_path / "whole"
    finetune(cfg_for(setup, **sets), whole, progress=False)

    class Stop(Exception):
        pass

    def stop_at_4(kind, rec):
        if kind == "log" and rec["step"] == 4:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        finetune(cfg_for(setup, **sets), part, progress=False, on_event=stop_at_4)    # last checkpoint: step 3
    finetune(cfg_for(setup, **sets), part, resume=True, progress=False)
    a, b = _logs(whole), _logs(part)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]


def test_bad_inputs_have_clear_messages(setup, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n" +
                    json.dumps({"prompt": "x" * 40, "completion": "2"}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:2: the prompt is \d+ tokens; with grpo.max_new_tokens = 6"):
        build_job(cfg_for(setup, **{"data.path": long}))
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    with pytest.raises(DataError, match="noanswer.jsonl:1: the row has no reference answer"):
        build_job(cfg_for(setup, **{"data.path": noanswer, "grpo.reward": "auto"}))
    other = tmp_path / "other"
    tok = byte_level_tokenizer()
    tok.add_special_tokens(["<extra>"])
    save_tokenizer(tok, tmp_path)
    moelab.save(DeepSeekForCausalLM.from_config(make_config(TINY_MOE | {"vocab_size": 300}), seed=1), other,
                tokenizer=tmp_path)
    with pytest.raises(CheckpointError, match="different tokenizer from finetune.base"):
        build_job(cfg_for(setup, **{"grpo.reference": other}))
    with pytest.raises(ConfigError, match="multiple of grpo.group"):
        cfg_for(setup, **{"train.batch_size": 6})
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        build_job(cfg_for(setup, **{"grpo.reward": f"{setup / 'rules.py'}:nope"}))


def test_a_raising_reward_is_counted_and_reported(setup, tmp_path):
    _, summary = finetune(cfg_for(setup, **{"train.steps": 2, "grpo.reward": f"{setup / 'rules.py'}:raises"}),
                          tmp_path / "r", progress=False)
    rep = summary["rewards"]
    assert rep["reward_errors"] > 0 and "ValueError: odd" in rep["first_problem"]
    logs = _logs(tmp_path / "r")
    assert sum(r["reward_errors"] for r in logs) == rep["reward_errors"]


def test_cli_grpo_runs_and_reports_bad_input_in_one_line(setup, tmp_path):
    from typer.testing import CliRunner

    from moelab.cli import app

    toml = tmp_path / "grpo.toml"
    toml.write_text(f'[finetune]\nbase = "{setup / "base"}"\n[data]\npath = "{setup / "tasks.jsonl"}"\nseq_len = 24\n'
                    '[train]\nsteps = 2\nbatch_size = 4\ndtype = "float32"\ndevice = "cpu"\n'
                    '[grpo]\ngroup = 4\nmax_new_tokens = 4\n')
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "grpo", str(toml), "--out", str(tmp_path / "r"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "trainable parameters" in r.output and (tmp_path / "r" / "model").is_dir()
    r = runner.invoke(app, ["finetune", "grpo", str(toml), "--out", str(tmp_path / "x"),
                            "--set", "grpo.max_new_tokens=40"])
    assert r.exit_code == 1 and "raise data.seq_len" in r.output and "Traceback" not in r.output
