"""Passkey retrieval: prompts of the asked length with the key at the asked depth, answers parsed, the grid
with lengths beyond the context skipped, the heatmap and JSON written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moelab.cli import app
from moelab.evaluate.lm import encode
from moelab.evaluate.passkey import FILLER, answered, needle, passkey_prompt


@pytest.fixture(scope="module")
def long_tiny(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (256 positions, byte-level tokens) extended 8x with YaRN: 2,048 positions."""
    from moelab.interop.extend_context import extend_context

    return extend_context(tiny_checkpoint, 8, tmp_path_factory.mktemp("pk") / "long")


def test_prompt_length_and_depth(long_tiny):
    from moelab.interop.hf_lm import load_causal_lm

    model, tok = load_causal_lm(long_tiny)
    unit = len(encode(tok, FILLER))
    key_ids = encode(tok, needle(12345))
    for length in (300, 600, 1000):
        for depth in (0.0, 0.3, 1.0):
            ids = passkey_prompt(model, tok, length, depth, 12345)
            assert abs(len(ids) - length) <= unit
            at = next(i for i in range(len(ids)) if ids[i:i + len(key_ids)] == key_ids)
            filler_tokens = len(ids) - len(key_ids)
            assert abs(at / filler_tokens - depth) < 0.25 + unit / length
    assert answered(" 12345. Remember", 12345) and not answered(" 1234", 12345) and not answered("none", 12345)


def test_cli_grid_and_files(long_tiny, tmp_path):
    res = CliRunner().invoke(app, ["eval", "passkey", str(long_tiny), "--lengths", "300,500,4096", "--depths",
                                   "0,1", "--trials", "2", "-q", "--device", "cpu", "--out", str(tmp_path / "pk")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert result["lengths"] == [300, 500] and result["skipped_lengths"] == [4096]
    assert len(result["accuracy"]) == 2 and len(result["accuracy"][0]) == 2
    assert (tmp_path / "pk" / "passkey.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["eval", "passkey", str(long_tiny), "--depths", "2"])
    assert bad.exit_code == 1 and "[0, 1]" in bad.output
