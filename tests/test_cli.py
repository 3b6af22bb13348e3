"""The ``moelab`` command line: info, init, generate.

Most commands run in-process (typer's CliRunner) to keep the suite fast; generation is also run once
in a fresh interpreter so that reproducibility is checked across processes, not only within one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moelab
from moelab.cli import app
from moelab.config import load_model_config
from moelab.model.transformer import DeepSeekForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
PROMPT = ["--prompt-ids", "0,72,101,108,108,111"]


def invoke(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def subprocess_cli(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    p = subprocess.run([sys.executable, "-m", "moelab.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p.stdout


def last_line_ids(stdout: str) -> list[int]:
    """``--ids`` prints the new token ids, comma-separated, as the last line."""
    line = stdout.rstrip("\n").split("\n")[-1].strip()
    return [int(x) for x in line.split(",")] if line else []


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_model_config(TINY)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-init"
    result = invoke("init", TINY, "--out", out, "--seed", "0")
    assert "wrote" in result.stdout
    return out


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def test_info_text(tiny_cfg):
    out = invoke("info", TINY).stdout
    assert "total parameters" in out
    assert "activated parameters" in out
    n = sum(p.numel() for p in DeepSeekForCausalLM.from_config(tiny_cfg, seed=0).parameters())
    assert f"{n:,}" in out


def test_info_json_counts_the_model_parameters(tiny_cfg):
    data = json.loads(invoke("info", TINY, "--json").stdout)
    model = DeepSeekForCausalLM.from_config(tiny_cfg, seed=0)
    assert data["total_params"] == sum(p.numel() for p in model.parameters())
    assert 0 < data["activated_params"] < data["total_params"]
    assert data["moe_layers"] + data["dense_layers"] == tiny_cfg.num_hidden_layers
    assert data["config"] == str(TINY)


def test_info_seq_len(tiny_cfg):
    a = json.loads(invoke("info", TINY, "--json", "--seq-len", "100").stdout)
    b = json.loads(invoke("info", TINY, "--json", "--seq-len", "200").stdout)
    assert a["seq_len"] == 100 and b["seq_len"] == 200
    L, d = tiny_cfg.num_hidden_layers, tiny_cfg.hidden_size
    assert b["flops_per_token"] - a["flops_per_token"] == 12 * L * d * 100
    for bad in ("0", "-5"):
        r = invoke("info", TINY, "--seq-len", bad, ok=False)
        assert r.exit_code != 0


def test_info_path_with_brackets_is_not_console_markup(tmp_path, monkeypatch):
    (tmp_path / "[old]").mkdir()
    (tmp_path / "[old]" / "t.toml").write_text(TINY.read_text())
    monkeypatch.chdir(tmp_path)
    assert "[old]/t.toml" in invoke("info", "[old]/t.toml").stdout


def test_info_checkpoint_matches_toml(ckpt):
    from_toml = json.loads(invoke("info", TINY, "--json").stdout)
    for target in (ckpt, ckpt / "config.json"):
        from_ckpt = json.loads(invoke("info", target, "--json").stdout)
        assert from_ckpt.pop("config") == str(target)
        assert from_ckpt == {k: v for k, v in from_toml.items() if k != "config"}


# ----------------------------------------------------------------------------------------------
# init
# ----------------------------------------------------------------------------------------------
def test_init_writes_a_loadable_checkpoint(ckpt, tiny_cfg):
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    loaded = moelab.load(ckpt)
    fresh = DeepSeekForCausalLM.from_config(tiny_cfg, seed=0)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_init_rejects_bad_dtype(tmp_path):
    r = invoke("init", TINY, "--out", tmp_path / "x", "--dtype", "float16", ok=False)
    assert r.exit_code == 1 and "--dtype" in r.stderr
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
def test_greedy_generation_is_reproducible(ckpt, tiny_cfg):
    args = ["generate", ckpt, *PROMPT, "--greedy", "-n", "8", "--ids"]
    in_process = last_line_ids(invoke(*args).stdout)
    fresh_process = last_line_ids(subprocess_cli(*args))
    assert in_process == fresh_process
    assert 1 <= len(in_process) <= 8
    assert all(0 <= i < tiny_cfg.vocab_size for i in in_process)
    if len(in_process) < 8:  # generation may only stop early at EOS
        assert in_process[-1] == tiny_cfg.eos_token_id


def test_greedy_generation_from_text_prompt(ckpt):
    args = ["generate", ckpt, "--prompt", "To be", "--greedy", "-n", "8", "--ids"]
    a, b = invoke(*args).stdout, invoke(*args).stdout
    assert a == b
    assert a.startswith("To be")
    assert 1 <= len(last_line_ids(a)) <= 8


def test_seeded_sampling_is_reproducible(ckpt):
    args = ["generate", ckpt, *PROMPT, "-n", "8", "--ids", "--temperature", "1.0", "--seed", "1"]
    a = last_line_ids(invoke(*args).stdout)
    b = last_line_ids(subprocess_cli(*args))
    assert a == b and len(a) >= 1
    c = last_line_ids(invoke(*args[:-1], "2").stdout)
    assert c != a  # another seed gives another continuation (near-uniform untrained model)


def test_top_k_one_and_temperature_zero_equal_greedy(ckpt):
    base = ["generate", ckpt, *PROMPT, "-n", "8", "--ids", "--no-stream"]
    greedy = last_line_ids(invoke(*base, "--greedy").stdout)
    assert last_line_ids(invoke(*base, "--top-k", "1", "--seed", "5").stdout) == greedy
    assert last_line_ids(invoke(*base, "--top-k", "1", "--temperature", "3.0").stdout) == greedy
    assert last_line_ids(invoke(*base, "--temperature", "0").stdout) == greedy


def test_generate_matches_library_greedy(ckpt):
    from moelab.infer import generate

    ids = [int(x) for x in PROMPT[1].split(",")]
    model = moelab.load(ckpt)
    out = generate(model, torch.tensor([ids]), 8, eos_token_id=model.config.eos_token_id)
    cli = last_line_ids(invoke("generate", ckpt, *PROMPT, "--greedy", "-n", "8", "--ids").stdout)
    assert out[0, len(ids):].tolist() == cli


@pytest.mark.parametrize("args,needle", [
    ([], "--prompt"),                                   # neither --prompt nor --prompt-ids
    (["-p", "hi", "--prompt-ids", "1"], "--prompt"),    # both
    (["--prompt-ids", "0,x"], "--prompt-ids"),
    (["--prompt-ids", "0,9999"], "9999"),
    (["-p", "hi", "--top-p", "1.5"], "top_p"),
    (["-p", "hi", "--dtype", "float16"], "--dtype"),
])
def test_generate_bad_arguments(ckpt, args, needle):
    r = invoke("generate", ckpt, *args, ok=False)
    assert r.exit_code == 1, r.output
    assert needle in r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_generate_zero_tokens(ckpt):
    assert last_line_ids(invoke("generate", ckpt, *PROMPT, "-n", "0", "--ids", "--greedy").stdout) == []


# ----------------------------------------------------------------------------------------------
# help
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["info"], ["init"], ["generate"]])
def test_help(command):
    out = invoke(*command, "--help").stdout
    assert "Usage" in out
    for cmd in ("info", "init", "generate") if not command else ():
        assert cmd in out


def test_info_of_a_checkpoint_counts_what_loads(tiny_checkpoint):
    """`moelab info CKPT --json` (counted on the meta device) equals the parameters of the loaded model."""
    out = json.loads(invoke("info", tiny_checkpoint, "--json").stdout)
    model = moelab.load(tiny_checkpoint)
    assert out["total_params"] == sum(p.numel() for p in model.parameters())
