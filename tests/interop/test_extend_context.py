"""`moelab extend-context`: YaRN set on a checkpoint — config fields as DeepSeek writes them, weights
unchanged, transformers opens the result with the same logits as moelab, factors compose, and a training
stage at the longer length continues from it with no [model] section."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import moelab
from moelab.cli import app
from moelab.errors import CheckpointError
from moelab.interop.extend_context import extend_context


def test_extended_checkpoint_opens_in_transformers_with_the_same_logits(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "long"
    res = CliRunner().invoke(app, ["extend-context", str(tiny_checkpoint), "--factor", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg["rope_parameters"]
    assert cfg["max_position_embeddings"] == 4 * 256
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 256)
    assert (rope["beta_fast"], rope["beta_slow"], rope["mscale"], rope["mscale_all_dim"]) == (32.0, 1.0, 0.707, 0.707)
    assert (out / "model.safetensors").read_bytes() == (tiny_checkpoint / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (1, 600))                  # longer than the original 256 positions
    ours = moelab.load(out).eval()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=2e-4, rtol=2e-4)
        base = moelab.load(tiny_checkpoint).eval()(ids[:, :200]).logits
    assert not torch.allclose(ours(ids[:, :200]).logits, base, atol=1e-3)    # YaRN changed the attention

    twice = extend_context(out, 2, tmp_path / "longer")
    cfg2 = json.loads((twice / "config.json").read_text())
    assert cfg2["rope_parameters"]["factor"] == 8.0 and cfg2["max_position_embeddings"] == 2048
    assert cfg2["rope_parameters"]["original_max_position_embeddings"] == 256


def test_bad_input(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="must be > 1"):
        extend_context(tiny_checkpoint, 1.0, tmp_path / "x")
    with pytest.raises(CheckpointError, match="itself"):
        extend_context(tiny_checkpoint, 2.0, tiny_checkpoint)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        extend_context(tmp_path / "nope", 2.0, tmp_path / "y")


def test_training_stage_at_the_longer_length(tiny_checkpoint, excerpt_tokens, tmp_path):
    """A run config without [model] continues the model of train.init_from (here at 2x its old context)."""
    from moelab.train.config import load_run_config
    from moelab.train.loop import train

    long = extend_context(tiny_checkpoint, 2.0, tmp_path / "long")
    (tmp_path / "c.toml").write_text(f'[data]\npath = "{excerpt_tokens}"\nseq_len = 400\n\n[train]\n'
                                     f'init_from = "{long}"\nsteps = 2\nbatch_size = 1\nlr = 1e-3\nwarmup_steps = 0\n'
                                     'eval_every = 2\nckpt_every = 2\neval_batches = 1\ndtype = "float32"\n'
                                     'device = "cpu"\n')
    cfg = load_run_config(tmp_path / "c.toml")
    assert cfg.model.max_position_embeddings == 512 and cfg.model.rope_scaling.factor == 2.0
    res = train(cfg, tmp_path / "run", progress=False)
    assert res.status == "finished"
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["max_position_embeddings"] == 512
