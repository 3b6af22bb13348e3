"""What moelab writes to config.json: keys transformers' DeepseekV2Config / DeepseekV3Config know, plus
a fixed, explained list of hub / moelab keys that they do not — and never a runtime setting."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, DeepseekV2Config, DeepseekV3Config, PretrainedConfig  # noqa: E402

import moelab  # noqa: E402
from moelab.config import NOT_IN_CONFIG_JSON, RUNTIME_FIELDS, ModelConfig, make_config, runtime_settings  # noqa: E402
from moelab.interop.hf_config import config_from_hf  # noqa: E402

# Keys transformers reads under their older names: torch_dtype (now dtype) and a top-level rope_theta
# (now inside rope_parameters; the hub code and older transformers read it there).
LEGACY = {"torch_dtype", "rope_theta"}

# Keys moelab writes that the transformers class of the model_type does not know (it keeps them as
# attributes, so they survive its own save_pretrained). Each is kept so that moelab reads back what it
# wrote; the first group changes what the model computes, the second does not.
NOT_IN_TRANSFORMERS = {
    # what the model computes
    "scoring_func": "router scores (softmax / sigmoid); hub V2/V3 configs carry it",
    "topk_method": "router selection; DeepseekV2Config knows it, DeepseekV3Config does not",
    "moe_layer_freq": "which layers are MoE; hub configs carry it, transformers ignores it",
    "use_mla": "MLA or MHA/GQA attention; DeepSeek-VL2 configs carry it",
    "rope_interleave": "RoPE pair layout; DeepseekV3Config knows it, DeepseekV2Config does not",
    "scale_only_if_unnormalized": "hub V2 routed-scaling rule; moelab-only, written only when true",
    "yarn_apply": "YaRN only when the context is longer (reference code); moelab-only, written only when so",
    # hub fields the forward ignores, kept for round trips of hub configs
    "aux_loss_alpha": "hub training field", "seq_aux": "hub training field", "ep_size": "hub parallelism field",
    "num_nextn_predict_layers": "V3 multi-token prediction layers; DeepseekV2Config does not know it",
}

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            max_position_embeddings=256, first_k_dense_replace=1, n_routed_experts=16)
RUNTIME = dict(attn_impl="naive", expert_impl="loop", compile_experts=True)     # all off their defaults
CASES = {
    "v3": (DeepseekV3Config, TINY | RUNTIME | dict(
        q_lora_rank=32, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, scoring_func="sigmoid",
        topk_method="noaux_tc", routed_scaling_factor=2.5, yarn_apply="when_longer",
        rope_scaling=dict(factor=4.0, original_max_position_embeddings=64, mscale_all_dim=1.0))),
    "v2": (DeepseekV2Config, TINY | RUNTIME | dict(
        q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3, scoring_func="softmax", topk_method="greedy",
        norm_topk_prob=False, rope_interleave=False, scale_only_if_unnormalized=True)),
}


def known_keys(cls: type) -> set[str]:
    """Keys the transformers config class defines, as attributes or as constructor arguments."""
    return set(cls().to_dict()) | (set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"})


def written(case: str, tmp_path) -> tuple[ModelConfig, dict]:
    cfg = make_config(CASES[case][1])
    moelab.save(moelab.DeepSeekForCausalLM.from_config(cfg, seed=0), tmp_path / case)
    return cfg, json.loads((tmp_path / case / "config.json").read_text())


def test_config_json_holds_only_keys_transformers_knows_or_listed_ones(tmp_path):
    unknown_anywhere = set()
    for case, (cls, _) in CASES.items():
        cfg, raw = written(case, tmp_path)
        assert raw["model_type"] == cls.model_type
        unknown = set(raw) - known_keys(cls) - set(PretrainedConfig().to_dict()) - LEGACY
        assert unknown <= set(NOT_IN_TRANSFORMERS), f"{case}: {sorted(unknown - set(NOT_IN_TRANSFORMERS))}"
        unknown_anywhere |= unknown
    assert unknown_anywhere == set(NOT_IN_TRANSFORMERS)         # the list holds nothing stale


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_settings_stay_out_and_the_rest_round_trips(case, tmp_path):
    cfg, raw = written(case, tmp_path)
    assert not set(NOT_IN_CONFIG_JSON) & set(raw)
    back = config_from_hf(raw)
    defaults = ModelConfig()
    for name in set(ModelConfig.model_fields) - {"model_type"}:     # None on export means the derived type
        want = getattr(defaults if name in NOT_IN_CONFIG_JSON else cfg, name)
        assert getattr(back, name) == want, name
    assert back.model_type == cfg.hf_model_type
    assert runtime_settings(back) == {k: getattr(defaults, k) for k in RUNTIME_FIELDS}
    loaded = moelab.load(tmp_path / case, **runtime_settings(cfg))      # a run's settings over a checkpoint
    assert runtime_settings(loaded.config) == RUNTIME


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_opens_it_and_keeps_the_listed_keys(case, tmp_path):
    _, raw = written(case, tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path / case)
    assert isinstance(hf, CASES[case][0]) and hf.dtype == torch.float32
    for key in set(raw) & set(NOT_IN_TRANSFORMERS):
        assert getattr(hf, key) == raw[key], key
