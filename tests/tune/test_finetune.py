"""`moelab finetune`: full, LoRA, PeriodicLoRA and ESFT runs through the training loop, end to end.

A tiny MoE model with a trained tokenizer and two-term arithmetic prompt/completion records written
here (so the module runs where reasoning-gym is not installed, e.g. on the GPU machine); a few optimizer
steps each. The methods' own maths is tested in test_lora.py,
test_plora.py and test_esft.py; here: what trains, what is written, resume, merge and bad input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import TINY_MOE
from typer.testing import CliRunner

import moelab
from moelab.cli import app
from moelab.config import make_config
from moelab.data.tasks import write_jsonl
from moelab.data.tokenizer import save_tokenizer, train_tokenizer
from moelab.data.tokens import prepare
from moelab.errors import CheckpointError, ConfigError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.config import load_finetune_config
from moelab.tune.run import finetune, merge_result

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"
MODEL = TINY_MOE | {"first_k_dense_replace": 1}     # tests/support/tiny.py


def arithmetic(n: int, seed: int) -> list[dict]:
    """``n`` records like reasoning-gym's two-term ``arithmetic``: 'Calculate 5 - 33.' → '-28'."""
    rng = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(1, 50, (n,), generator=rng) for _ in range(2))
    plus = torch.rand(n, generator=rng) < 0.5
    return [{"prompt": f"Calculate {x} {'+' if p else '-'} {y}.", "completion": str(x + y if p else x - y)}
            for x, y, p in zip(a.tolist(), b.tolist(), plus.tolist(), strict=True)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    text = EXCERPT.read_text(encoding="utf-8")
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)] + ["0123456789 +-=."], 300)
    tok_dir = root / "tok"
    tok_dir.mkdir()
    save_tokenizer(tok, tok_dir)
    base = root / "base"
    moelab.save(DeepSeekForCausalLM.from_config(make_config(MODEL), seed=0), base, tokenizer=tok_dir)
    data = write_jsonl(arithmetic(120, seed=0), root / "arith.jsonl")
    src = root / "corpus"
    src.mkdir()
    for i in range(4):
        (src / f"d{i}.txt").write_text(text[i * 3000:(i + 1) * 3000], encoding="utf-8")
    general = root / "general"
    prepare([src], general, tokenizer=tok_dir, val_docs=1, progress=False)
    return {"root": root, "base": base, "data": data, "general": general}


def cfg_for(s, method: str, **extra):
    sets = [f"finetune.base={s['base']}", f"data.path={s['data']}", "data.seq_len=32", "data.val_fraction=0.1",
            f"data.general_path={s['general']}", "train.steps=6", "train.batch_size=4", "train.lr=3e-3",
            "train.dtype=float32", "train.eval_every=3", "train.ckpt_every=3", "train.log_every=1",
            "train.eval_batches=2", "train.keep_last=5"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_finetune_config(None, sets, method=method)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_full_finetune_trains_everything_and_writes_a_checkpoint(setup, tmp_path):
    res, summary = finetune(cfg_for(setup, "full"), tmp_path / "run", progress=False)
    assert res.status == "finished" and res.step == 6
    assert summary["trainable_params"] == summary["total_params"] > 0
    model = moelab.load(tmp_path / "run" / "model")
    base = moelab.load(setup["base"])
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "general_val_loss" in r)
    assert first["step"] == 0                           # the forgetting baseline, before any step
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["method"] == "full"


def test_resume_continues_exactly(setup, tmp_path):
    whole, _ = finetune(cfg_for(setup, "lora"), tmp_path / "a", progress=False)
    cfg = cfg_for(setup, "lora")

    class Stop(Exception):
        pass

    def stop_at_4(kind, rec):
        if kind == "log" and rec["step"] == 4:
            raise Stop
    with pytest.raises(Stop):
        finetune(cfg, tmp_path / "b", progress=False, on_event=stop_at_4)
    rest, _ = finetune(cfg, tmp_path / "b", resume=True, progress=False)   # from the step-3 checkpoint
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert rest.step == 6 and all(a[k] == b[k] for k in (4, 5, 6))


@pytest.mark.parametrize("method", ["lora", "plora"])
def test_lora_methods_train_only_lora_and_merge(setup, tmp_path, method):
    extra = {"plora.stage_steps": 2} if method == "plora" else {}
    res, summary = finetune(cfg_for(setup, method, **extra), tmp_path / "run", progress=False)
    assert 0 < summary["trainable_params"] < summary["total_params"] / 2
    if method == "lora":
        adapter = tmp_path / "run" / "adapter"
        assert (adapter / "adapter_config.json").is_file()
        merged = merge_result(setup["base"], adapter, tmp_path / "merged")
        model = moelab.load(merged)
    else:
        model = moelab.load(tmp_path / "run" / "model")
    base = moelab.load(setup["base"])
    assert not torch.equal(model.model.layers[1].mlp.experts.gate_up_proj,
                           base.model.layers[1].mlp.experts.gate_up_proj)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)   # not a target
    assert torch.equal(model.model.layers[1].mlp.gate.weight, base.model.layers[1].mlp.gate.weight)


def test_esft_trains_only_selected_experts(setup, tmp_path):
    from moelab.tune.esft import write_expert_config

    ecfg = tmp_path / "expert_cfg.json"
    write_expert_config({"experts": {"1": [2, 5]}, "shared_experts": False, "non_expert_modules": False}, ecfg)
    res, summary = finetune(cfg_for(setup, "esft", **{"esft.expert_config": str(ecfg)}), tmp_path / "run",
                            progress=False)
    E_params = 2 * (2 * 16 * 32 + 32 * 16)            # two experts: gate+up [2I, H] and down [H, I]
    assert summary["trainable_params"] == E_params
    out = tmp_path / "run" / "esft"
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted(f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in (2, 5)
                          for p in ("gate", "up", "down"))
    merged = moelab.load(merge_result(setup["base"], out, tmp_path / "merged"))
    base = moelab.load(setup["base"])
    gu, gu0 = merged.model.layers[1].mlp.experts.gate_up_proj, base.model.layers[1].mlp.experts.gate_up_proj
    changed = [e for e in range(8) if not torch.equal(gu[e], gu0[e])]
    assert changed == [2, 5]


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("method", ["lora", "esft"])
def test_compiled_blocks_finetune_to_the_eager_losses(setup, tmp_path, method):
    """``train.compile = true`` (whole blocks) with LoRA adapters on the experts, and with ESFT's frozen
    expert rows: the losses of the eager run (fp32: the experts run eagerly inside the compiled blocks)."""
    extra = {}
    if method == "esft":
        from moelab.tune.esft import write_expert_config

        write_expert_config({"experts": {"1": [2, 5]}, "shared_experts": False, "non_expert_modules": False},
                            tmp_path / "expert_cfg.json")
        extra = {"esft.expert_config": str(tmp_path / "expert_cfg.json")}
    finetune(cfg_for(setup, method, **extra), tmp_path / "eager", progress=False)
    finetune(cfg_for(setup, method, **extra, **{"train.compile": "true"}), tmp_path / "compiled", progress=False)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 6
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)


def test_cli_finetune_and_bad_input(setup, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "lora", str(_toml(tmp_path, setup)), "--out", str(tmp_path / "r"),
                            "--no-progress", "--set", "lora.r=2"])
    assert r.exit_code == 0, r.output
    assert "trainable parameters" in r.output and (tmp_path / "r" / "adapter").is_dir()
    # bad inputs: one line, exit 1
    r = runner.invoke(app, ["finetune", "full", str(_toml(tmp_path, setup)), "--base", str(tmp_path / "nope"),
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "not a checkpoint directory" in r.output
    r = runner.invoke(app, ["finetune", "esft", str(_toml(tmp_path, setup)), "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "esft.expert_config" in r.output
    r = runner.invoke(app, ["finetune", "lora", str(_toml(tmp_path, setup)), "--set", "lora.target_modules=nothing",
                            "--out", str(tmp_path / "z")])
    assert r.exit_code == 1 and "nothing" in r.output
    r = runner.invoke(app, ["finetune", "full", str(_toml(tmp_path, setup)), "--set", "train.stepz=3"])
    assert r.exit_code == 1 and "steps" in r.output
    assert "Traceback" not in r.output


def _toml(tmp_path: Path, s) -> Path:
    p = tmp_path / "ft.toml"
    p.write_text(f'[finetune]\nbase = "{s["base"]}"\n[data]\npath = "{s["data"]}"\nseq_len = 32\n'
                 '[train]\nsteps = 2\nbatch_size = 2\ndtype = "float32"\n')
    return p


def test_config_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match=r"no \[finetune\] section"):
        load_finetune_config(None, [f"data.path={setup['data']}", "train.steps=1"])
    bad = tmp_path / "b.toml"
    bad.write_text("[finetune]\nbase='x'\n[lorra]\nr=2\n")
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        load_finetune_config(bad)
    minimal = ["finetune.base=x", "data.path=y", "train.steps=1"]
    assert load_finetune_config(None, minimal, method="lora").train.lr == 1e-4      # the paper's default
    assert load_finetune_config(None, minimal + ["train.lr=0.01"], method="full").train.lr == 0.01
    with pytest.raises(ConfigError, match="unknown fine-tuning method"):
        load_finetune_config(None, minimal, method="qlora")
    no_tok = tmp_path / "notok"
    moelab.save(DeepSeekForCausalLM.from_config(make_config(MODEL)), no_tok)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        finetune(cfg_for({**setup, "base": no_tok}, "full"), tmp_path / "r", progress=False)


def test_cli_esft_train_equals_finetune_esft(setup, tmp_path):
    from moelab.tune.esft import write_expert_config

    ecfg = write_expert_config({"experts": {"1": [0, 3]}, "shared_experts": False, "non_expert_modules": False},
                               tmp_path / "cfg.json")
    runner = CliRunner()
    r = runner.invoke(app, ["esft", "train", str(_toml(tmp_path, setup)), "--experts", str(ecfg),
                            "--out", str(tmp_path / "a"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", "esft", str(_toml(tmp_path, setup)), "--set", f"esft.expert_config={ecfg}",
                            "--out", str(tmp_path / "b"), "--no-progress"])
    assert r.exit_code == 0, r.output
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a == b and 2 in a                  # identical runs, through to the last step
    r = runner.invoke(app, ["esft", "train", str(_toml(tmp_path, setup)), "--experts", str(tmp_path / "missing.json"),
                            "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "missing.json" in r.output


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "esft"])
def test_finetune_methods_on_the_gpu(setup, tmp_path, gpu, method):
    """Each method on the GPU: fp32 losses follow the CPU run's; under bf16 autocast it trains."""
    from moelab.tune.esft import write_expert_config

    extra = {}
    if method == "esft":
        ecfg = tmp_path / "expert_cfg.json"
        write_expert_config({"experts": {"1": [2, 5]}, "shared_experts": False, "non_expert_modules": False}, ecfg)
        extra["esft.expert_config"] = str(ecfg)
    finetune(cfg_for(setup, method, **extra, **{"train.device": "cpu"}), tmp_path / "cpu", progress=False)
    res, _ = finetune(cfg_for(setup, method, **extra, **{"train.device": str(gpu)}), tmp_path / "gpu",
                      progress=False)
    assert res.status == "finished"
    a, b = losses(tmp_path / "cpu"), losses(tmp_path / "gpu")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-3
    bf, _ = finetune(cfg_for(setup, method, **extra, **{"train.device": str(gpu), "train.dtype": "bfloat16"}),
                     tmp_path / "bf16", progress=False)
    c = losses(tmp_path / "bf16")
    assert bf.status == "finished" and max(abs(a[k] - c[k]) for k in a) < 0.05 * max(a.values())
