"""A bad model config gets a clear ConfigError that names the key and what is valid, never a deep stack trace."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from errcheck import clean_message, write_toml  # tests/support

from moelab.config import load_model_config, make_config
from moelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
BASE = tomllib.loads(TINY.read_text())["model"]


# ----------------------------------------------------------------------------------------------
# config: unknown keys, sections, files
# ----------------------------------------------------------------------------------------------
def test_toml_writer_round_trips(tmp_path):
    assert load_model_config(write_toml(tmp_path / "ok.toml", BASE)) == load_model_config(TINY)


def test_unknown_key_names_key_and_suggestion():
    with pytest.raises(ConfigError) as ei:
        make_config({**BASE, "hiden_size": 128})
    msg = clean_message(ei.value)
    assert "'hiden_size'" in msg and "'hidden_size'" in msg


def test_unknown_key_in_toml_names_key_suggestion_and_file(tmp_path):
    path = write_toml(tmp_path / "typo.toml", {**BASE, "num_experts_per_tokens": 4})
    with pytest.raises(ConfigError) as ei:
        load_model_config(path)
    msg = clean_message(ei.value)
    assert "num_experts_per_tokens" in msg and "'num_experts_per_tok'" in msg
    assert "typo.toml" in msg


def test_unknown_nested_key_suggests_from_nested_fields(tmp_path):
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "betafast": 32.0}
    for err in (lambda: make_config({**BASE, "rope_scaling": rope}),
                lambda: load_model_config(write_toml(tmp_path / "rope.toml", {**BASE, "rope_scaling": rope}))):
        with pytest.raises(ConfigError) as ei:
            err()
        msg = clean_message(ei.value)
        assert "rope_scaling.betafast" in msg and "'beta_fast'" in msg


def test_unknown_key_without_close_match_has_no_bogus_suggestion():
    with pytest.raises(ConfigError) as ei:
        make_config({**BASE, "zzzzqqqq": 1})
    msg = clean_message(ei.value)
    assert "zzzzqqqq" in msg and "did you mean" not in msg


def test_unknown_toml_section(tmp_path):
    path = write_toml(tmp_path / "s.toml", BASE, {"modle_extra": {"x": 1}})
    with pytest.raises(ConfigError) as ei:
        load_model_config(path)
    msg = clean_message(ei.value)
    assert "[modle_extra]" in msg and "model" in msg


def test_misspelt_model_section_suggests_model(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(TINY.read_text().replace("[model]", "[modle]"))
    with pytest.raises(ConfigError) as ei:
        load_model_config(path)
    msg = clean_message(ei.value)
    assert "[modle]" in msg and "'model'" in msg


def test_missing_model_section(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"\[model\]"):
        load_model_config(path)


@pytest.mark.parametrize("text", ["[model]\nhidden_size = = 3\n", "[model\n", "hidden_size = 'unterminated\n"])
def test_invalid_toml(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_model_config(path)
    msg = clean_message(ei.value)
    assert "bad.toml" in msg and "TOML" in msg


def test_binary_file_as_toml(tmp_path):
    path = tmp_path / "weights.toml"
    path.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ConfigError, match="TOML"):
        load_model_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_model_config(tmp_path / "nope.toml")
    msg = clean_message(ei.value)
    assert "nope.toml" in msg and "not found" in msg


def test_model_key_that_is_not_a_table(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text("model = 5\n")
    with pytest.raises(ConfigError):
        load_model_config(path)


# ----------------------------------------------------------------------------------------------
# config: impossible combinations name the conflicting fields
# ----------------------------------------------------------------------------------------------
IMPOSSIBLE = {
    "topk_gt_experts": ({"num_experts_per_tok": 17}, ["num_experts_per_tok", "17", "n_routed_experts", "16"]),
    "n_group_not_dividing": ({"n_group": 3}, ["n_group", "3", "n_routed_experts", "16"]),
    "topk_group_gt_n_group": ({"topk_group": 5}, ["topk_group", "5", "n_group", "4"]),
    "noaux_tc_one_expert_per_group": ({"n_group": 16, "topk_group": 4}, ["noaux_tc", "n_group", "n_routed_experts"]),
    "topk_beyond_kept_groups": ({"topk_group": 1, "num_experts_per_tok": 5},
                                ["num_experts_per_tok", "topk_group"]),
    "odd_qk_rope_head_dim": ({"qk_rope_head_dim": 15}, ["qk_rope_head_dim", "15", "even"]),
    "negative_hidden": ({"hidden_size": -128}, ["hidden_size", "-128"]),
    "zero_layers": ({"num_hidden_layers": 0}, ["num_hidden_layers"]),
    "negative_moe_intermediate": ({"moe_intermediate_size": -1}, ["moe_intermediate_size"]),
    "negative_kv_lora_rank": ({"kv_lora_rank": -32}, ["kv_lora_rank"]),
    "negative_shared": ({"n_shared_experts": -1}, ["n_shared_experts"]),
    "negative_vocab": ({"vocab_size": -5}, ["vocab_size"]),
    "first_k_dense_gt_layers": ({"first_k_dense_replace": 5}, ["first_k_dense_replace", "5", "num_hidden_layers", "4"]),
    "bos_ge_vocab": ({"bos_token_id": 512}, ["bos_token_id", "512", "vocab_size"]),
    "eos_negative": ({"eos_token_id": -1}, ["eos_token_id", "vocab_size"]),
    "string_for_int": ({"hidden_size": "big"}, ["hidden_size", "'big'"]),
    "fraction_for_int": ({"num_hidden_layers": 2.5}, ["num_hidden_layers", "2.5"]),
    "bad_literal": ({"scoring_func": "relu"}, ["scoring_func", "'relu'"]),
    "yarn_factor_below_one": ({"rope_scaling": {"factor": 0.5, "original_max_position_embeddings": 256}},
                              ["rope_scaling.factor", "0.5"]),
    "yarn_missing_field": ({"rope_scaling": {"factor": 2.0}}, ["original_max_position_embeddings"]),
    "mha_kv_heads_not_dividing": ({"use_mla": False, "num_key_value_heads": 3},
                                  ["num_key_value_heads", "num_attention_heads"]),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_impossible_config_names_the_fields(case):
    overrides, needles = IMPOSSIBLE[case]
    with pytest.raises(ConfigError) as ei:
        make_config({**BASE, **overrides})
    msg = clean_message(ei.value)
    assert isinstance(ei.value, ValueError)
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from: {msg}"


@pytest.mark.parametrize("case", ["topk_gt_experts", "odd_qk_rope_head_dim", "string_for_int", "yarn_missing_field"])
def test_impossible_config_from_toml_names_fields_and_file(tmp_path, case):
    overrides, needles = IMPOSSIBLE[case]
    path = write_toml(tmp_path / f"{case}.toml", {**BASE, **overrides})
    with pytest.raises(ConfigError) as ei:
        load_model_config(path)
    msg = clean_message(ei.value)
    assert f"{case}.toml" in msg
    for needle in needles:
        assert needle in msg


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as ei:
        make_config({**BASE, "qk_rope_head_dim": 15, "bos_token_id": 9999})
    msg = clean_message(ei.value)
    assert "qk_rope_head_dim" in msg and "bos_token_id" in msg


def test_mha_zero_heads():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        make_config({**BASE, "use_mla": False, "num_attention_heads": 0})


def test_mha_negative_head_dim():
    with pytest.raises(ConfigError, match="head_dim"):
        make_config({**BASE, "use_mla": False, "head_dim": -2})


def test_boolean_is_not_a_number():
    with pytest.raises(ConfigError, match="num_hidden_layers must be a number"):
        make_config({**BASE, "num_hidden_layers": True})
