"""``moelab plan`` through a small typer app (the command is registered in moelab.cli by its owner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from moelab.config import load_model_config
from moelab.dist.plan import Mesh, plan
from moelab.dist.plan_cli import plan as plan_command
from moelab.interop.hf_config import config_to_hf

ROOT = Path(__file__).resolve().parents[2]
V3 = ROOT / "configs" / "deepseek-v3.toml"
TINY = ROOT / "configs" / "tiny.toml"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.command()(plan_command)


@app.command()
def other():   # a second command, so that typer keeps "plan" as a sub-command name as in moelab
    pass


def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(app, ["plan", *map(str, args)], env={"COLUMNS": "200", "NO_COLOR": "1"})
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_v3_table():
    out = invoke(V3, "--gpus", 2048, "--gpu-memory", "80GB", "--mesh", "dp=32,ep=64").output
    for text in ("2,048 GPUs (dp=32 × ep=64, 8 per node)", "327.6M of 671.0B", "4 routed experts per layer /32",
                 "AdamW m, v", "FSDP buffers", "activations saved", "largest micro-batch", "FSDP all-gather",
                 "FSDP reduce-scatter", "expert all-to-all", "63/64", "≤ 57,344 B", "≤ 4 nodes", "114,688 B",
                 "expected 3.50 remote nodes"):
        assert text in out, text


def test_json_is_the_plan():
    got = json.loads(invoke(TINY, "--gpus", 8, "--mesh", "dp=2,ep=4", "--seq-len", 512, "--micro-batch", 4,
                            "--grad-accum", 2, "--gpu-memory", "24GiB", "--json").output)
    want = plan(load_model_config(TINY), Mesh(dp=2, ep=4), 512, 4, grad_accum=2, gpu_memory=24 * 2**30).as_dict()
    assert got == {"config": str(TINY), **json.loads(json.dumps(want))}
    assert got["comm"]["all_to_all"] > 0 and got["max_micro_batch_ckpt"] >= got["max_micro_batch"] > 0


def test_defaults_and_a_checkpoint_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(load_model_config(TINY))))
    for source in (tmp_path, tmp_path / "config.json"):
        got = json.loads(invoke(source, "--gpus", 4, "--json").output)
        assert (got["dp"], got["ep"]) == (1, 4)                    # default: ep = largest divisor of 16 <= 4
        assert got["seq_len"] == 1024 and got["gpu_memory_bytes"] == 80e9
    one = invoke(TINY, "--gpus", 1, "--precision", "fp32").output
    assert "bf16 weight casts" in one and "expert all-to-all" not in one


@pytest.mark.parametrize("args, message", [
    ((V3, "--gpus", 2048, "--mesh", "dp=30,ep=64"), "= 1920 ranks, but --gpus is 2048"),
    ((V3, "--gpus", 24, "--mesh", "dp=8,ep=3"), "ep=3 does not divide the 256 routed experts"),
    ((V3, "--gpus", 512, "--mesh", "ep=512"), "larger than the 256 routed experts"),
    ((V3, "--gpus", 8, "--mesh", "tp=8"), "unknown dimension 'tp'"),
    ((V3, "--gpus", 8, "--gpu-memory", "lots"), "cannot read the memory size"),
    ((V3, "--gpus", 8, "--precision", "fp16"), "unknown precision 'fp16'"),
    ((V3, "--gpus", 8, "--dense-shard", "all"), "--dense-shard must be 'world' or 'dp'"),
    ((ROOT / "nowhere.toml", "--gpus", 8), "does not exist"),
])
def test_errors_are_one_line(args, message):
    result = invoke(*args, ok=False)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
