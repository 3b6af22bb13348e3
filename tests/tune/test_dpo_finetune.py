"""`moelab finetune dpo` end to end on a tiny MoE: the reference log-probabilities are the base model's, the
first step's DPO loss is log 2 (policy = reference), training raises the chosen answers over the rejected
ones, full / LoRA / ESFT variants write their results, the batches are interleaved whole pairs, and resume
is exact."""

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
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.config import load_finetune_config
from moelab.tune.run import finetune


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    save_tokenizer(byte_level_tokenizer(), root)
    base = root / "base"
    moelab.save(DeepSeekForCausalLM.from_config(make_config(TINY_MOE | {"vocab_size": 300}), seed=0), base,
                tokenizer=root)
    rows = [{"prompt": f"{a} + {b} =", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(6) for b in range(5)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "experts.json").write_text(json.dumps({"experts": {"0": [1, 2], "1": [3]}}))
    return root


def cfg_for(s: Path, **extra):
    sets = [f"finetune.base={s / 'base'}", f"data.path={s / 'prefs.jsonl'}", "data.seq_len=24",
            "data.val_fraction=0.2", "train.steps=8", "train.batch_size=4", "train.lr=3e-3", "train.dtype=float32",
            "train.device=cpu", "train.eval_every=4", "train.ckpt_every=4", "train.log_every=1",
            "train.eval_batches=2", "train.keep_last=5", f"esft.expert_config={s / 'experts.json'}"]
    return load_finetune_config(None, sets + [f"{k}={v}" for k, v in extra.items()], method="dpo")


def _logs(run: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_dpo_trains_preferences(setup, tmp_path):
    """After 4 epochs the trained model prefers the chosen answers of the training pairs over the
    rejected ones relative to the base (implicit reward margin > 0 on most pairs)."""
    from moelab.tune.dpo_data import answer_logps
    from moelab.tune.run import build_job

    cfg = cfg_for(setup, **{"train.steps": 24, "train.lr": 1e-2, "dpo.beta": 0.5})
    res, summary = finetune(cfg, tmp_path / "run", progress=False)
    assert res.status == "finished" and summary["method"] == "dpo"
    logs = _logs(tmp_path / "run")
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)        # policy == reference at step 1
    assert logs[0]["dpo_margin"] == pytest.approx(0.0, abs=1e-6)
    job, _ = build_job(cfg)                                                # the same pairs, ref = the base
    data = job.train_data
    trained = moelab.load(tmp_path / "run" / "model").eval()
    rows = data.pair_rows(torch.arange(len(data)).numpy())
    with torch.no_grad():
        logp = answer_logps(trained(rows["x"]).logits, rows["y"]).double()
    margin = 0.5 * ((logp[0::2] - rows["ref"][0::2]) - (logp[1::2] - rows["ref"][1::2]))
    assert float(margin.mean()) > 0.1 and float((margin > 0).double().mean()) > 0.7


@pytest.mark.parametrize("train, result", [("lora", "adapter"), ("esft", "esft")])
def test_lora_and_expert_only_variants(setup, tmp_path, train, result):
    res, summary = finetune(cfg_for(setup, **{"dpo.train": train, "train.steps": 3}), tmp_path / "r",
                            progress=False)
    assert res.status == "finished" and (tmp_path / "r" / result).is_dir()
    assert summary["trainable_params"] < summary["total_params"]


def test_batches_are_whole_pairs_and_resume_is_exact(setup, tmp_path):
    from moelab.tune.run import build_job

    job, _ = build_job(cfg_for(setup))
    b = job.train_data.batch(4, 24, 3, 0, 0)
    assert b["x"].shape == (8, 24) and b["ref"].shape == (8,)
    chosen_ids, rejected_ids = b["x"][0::2], b["x"][1::2]
    first = (b["y"][0] != -100).nonzero()[0, 0]
    assert torch.equal(chosen_ids[:, :first], rejected_ids[:, :first])   # each pair shares its prompt
    whole = tmp_path / "whole"
    finetune(cfg_for(setup), whole, progress=False)

    class Stop(Exception):
        pass

    def stop_at_6(kind, rec):
        if kind == "log" and rec["step"] == 6:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        finetune(cfg_for(setup), part, progress=False, on_event=stop_at_6)
    finetune(cfg_for(setup), part, resume=True, progress=False)
    assert [r["loss"] for r in _logs(whole)] == [r["loss"] for r in _logs(part)]


def test_reference_checkpoint_gives_its_log_probabilities_and_must_share_the_tokenizer(setup, tmp_path):
    """``dpo.reference``: the reference log-probabilities are that checkpoint's (the base named explicitly
    gives exactly the default's); a reference with another tokenizer is refused with a clear message."""
    from moelab.errors import CheckpointError
    from moelab.tune.dpo_data import answer_logps
    from moelab.tune.run import build_job

    default, _ = build_job(cfg_for(setup))
    named, _ = build_job(cfg_for(setup, **{"dpo.reference": setup / "base"}))
    assert (named.train_data.ref == default.train_data.ref).all()
    other = tmp_path / "other"
    other_model = DeepSeekForCausalLM.from_config(make_config(TINY_MOE | {"vocab_size": 300}), seed=1)
    moelab.save(other_model, other, tokenizer=setup)
    job, summary = build_job(cfg_for(setup, **{"dpo.reference": other}))
    assert summary["dpo"]["reference"] == str(other)
    rows = job.train_data.pair_rows([0, 1])                  # brute force: the other model on two pairs
    with torch.no_grad():
        want = answer_logps(other_model.eval()(rows["x"]).logits, rows["y"]).double().view(-1, 2).numpy()
    assert abs(job.train_data.ref[:2] - want).max() < 1e-6
    assert abs(job.train_data.ref[:2] - default.train_data.ref[:2]).max() > 1e-3
    tok = byte_level_tokenizer()
    tok.add_special_tokens(["<extra>"])
    save_tokenizer(tok, tmp_path)
    moelab.save(other_model, tmp_path / "othertok", tokenizer=tmp_path)
    with pytest.raises(CheckpointError, match=r"dpo.reference .*othertok has a different tokenizer"):
        build_job(cfg_for(setup, **{"dpo.reference": tmp_path / "othertok"}))
    with pytest.raises(CheckpointError, match=r"dpo.reference .*nowhere is not a checkpoint directory"):
        build_job(cfg_for(setup, **{"dpo.reference": tmp_path / "nowhere"}))
