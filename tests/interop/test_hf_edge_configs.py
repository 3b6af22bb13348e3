"""config.json files at the edges of what transformers accepts, read and written as transformers reads them.

Oracle: transformers' own DeepseekV2/V3 classes on the same file (fp32 logits within 1e-4). Covers YaRN keys
transformers honours (``attention_factor``, ``truncate``, a lone ``mscale`` or ``mscale_all_dim``), settings
it opens without complaint (more leading dense layers than layers, special-token ids outside a shrunk
vocabulary), keys it honours that moelab cannot (``mlp_bias``), and the settings moelab computes that
transformers would not, which must be said out loud on save and on load.
"""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import moelab  # noqa: E402
from moelab.config import make_config  # noqa: E402
from moelab.errors import CheckpointError  # noqa: E402
from moelab.model.transformer import DeepSeekForCausalLM  # noqa: E402

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            max_position_embeddings=256, initializer_range=0.1, first_k_dense_replace=1, n_routed_experts=8,
            num_experts_per_tok=2)
V3 = dict(q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)
IDS = torch.randint(0, 160, (2, 48), generator=torch.Generator().manual_seed(7))   # past 32: YaRN matters


def hf_model(cls, cfg_cls, **kw):
    torch.manual_seed(1)
    return cls(cfg_cls(**(TINY | kw))).eval()


def max_diff(a, b) -> float:
    with torch.no_grad():
        return (a(IDS).logits - b(IDS).logits).abs().max().item()


@pytest.mark.parametrize("rope", [
    dict(YARN, mscale=1.0, mscale_all_dim=1.0, attention_factor=1.5),                   # explicit cos/sin factor
    dict(YARN, mscale=1.0, mscale_all_dim=1.0, truncate=False, original_max_position_embeddings=64),
    dict(YARN, mscale_all_dim=1.0),                                                      # transformers: mscale(s)
    dict(YARN, mscale=0.707),                                                            # idem
], ids=["attention_factor", "truncate_false", "only_mscale_all_dim", "only_mscale"])
def test_yarn_keys_read_as_transformers_reads_them(rope, tmp_path):
    kw = V3 | dict(rope_parameters=rope) | (dict(qk_rope_head_dim=32) if "truncate" in rope else {})
    hf = hf_model(DeepseekV3ForCausalLM, DeepseekV3Config, **kw)
    hf.save_pretrained(tmp_path)
    ours = moelab.load(tmp_path)
    assert ours.model.rotary_emb.attention_scaling == pytest.approx(hf.model.rotary_emb.attention_scaling)
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)
    assert max_diff(ours, hf) < 1e-4
    moelab.save(ours, tmp_path / "back")                   # and written so that transformers reads it back
    again = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert max_diff(ours, again) < 1e-4


def test_lone_mscale_is_exported_with_its_factor(tmp_path):
    """moelab's rule (mscale 0.707 over mscale_all_dim 0) is not transformers': attention_factor carries it."""
    cfg = make_config(TINY | V3 | dict(scoring_func="sigmoid", topk_method="noaux_tc", rope_scaling=dict(
        factor=4.0, original_max_position_embeddings=32, mscale=0.707)))
    ours = DeepSeekForCausalLM.from_config(cfg, seed=3).eval()
    moelab.save(ours, tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(0.1 * 0.707 * torch.log(torch.tensor(4.0)) + 1)
    assert max_diff(ours, hf) < 1e-4


def test_more_dense_layers_than_layers_and_foreign_token_ids_load(tmp_path, caplog):
    """transformers opens both (every layer dense; ids no token can have); so does moelab, and says so."""
    hf = hf_model(DeepseekV3ForCausalLM, DeepseekV3Config, **V3, first_k_dense_replace=5, bos_token_id=100000,
                  eos_token_id=100001)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moelab"):
        ours = moelab.load(tmp_path)
    assert ours.config.first_k_dense_replace == 3 and ours.config.moe_layer_ids == []
    assert ours.config.bos_token_id is None and ours.config.eos_token_id is None
    assert "bos_token_id 100000 is not a token of this 160-token vocabulary" in caplog.text
    assert max_diff(ours, hf) < 1e-4


def test_mlp_bias_is_refused_by_name(tmp_path):
    hf_model(DeepseekV3ForCausalLM, DeepseekV3Config, **V3, mlp_bias=True).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="mlp_bias = true .* not supported"):
        moelab.load(tmp_path)


def test_bias_tensor_under_another_topk_method_names_the_fix(tmp_path):
    """transformers' V3 router always uses e_score_correction_bias, whatever topk_method says."""
    hf_model(DeepseekV3ForCausalLM, DeepseekV3Config, **V3, topk_method="greedy").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match='e_score_correction_bias.*topk_method = .greedy.*"noaux_tc"'):
        moelab.load(tmp_path)


@pytest.mark.parametrize("kw, said", [
    (dict(q_lora_rank=None, n_shared_experts=2, scoring_func="softmax", topk_method="greedy",
          rope_interleave=False), "always rotates interleaved pairs"),
    (V3 | dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, scale_only_if_unnormalized=True),
     "scales the renormalised gates"),
    (V3 | dict(scoring_func="sigmoid", topk_method="noaux_tc", yarn_apply="when_longer", max_position_embeddings=256,
               rope_scaling=dict(factor=4.0, original_max_position_embeddings=512)), "applies YaRN whenever"),
], ids=["v2_halves", "v3_scale_only_if_unnormalized", "yarn_when_longer"])
def test_what_transformers_would_compute_otherwise_is_said_on_save_and_load(kw, said, tmp_path, caplog):
    ours = DeepSeekForCausalLM.from_config(make_config(TINY | kw), seed=3).eval()
    with pytest.warns(UserWarning, match=said):
        moelab.save(ours, tmp_path)
    with caplog.at_level(logging.WARNING, logger="moelab"):
        back = moelab.load(tmp_path)
    assert said in caplog.text
    assert max_diff(ours, back) == 0.0                     # moelab itself reads back what it wrote


def test_v2_files_transformers_reads_alike_load_silently(tmp_path, caplog):
    hf_model(DeepseekV2ForCausalLM, DeepseekV2Config, q_lora_rank=None, n_shared_experts=2).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moelab"):
        moelab.load(tmp_path)
    assert "transformers would not" not in caplog.text


@pytest.mark.parametrize("mscales", [dict(mscale=0.707), dict(mscale=0.0, mscale_all_dim=0.707)],
                         ids=["lone_mscale", "zero_mscale"])
def test_moelab_round_trip_keeps_its_yarn_config(mscales, tmp_path):
    """attention_factor is written for transformers' sake only: read back, moelab's config is the saved one
    (else train.init_from would see "another architecture")."""
    cfg = make_config(TINY | V3 | dict(scoring_func="sigmoid", topk_method="noaux_tc", rope_scaling=dict(
        factor=4.0, original_max_position_embeddings=32, **mscales)))
    moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=3), tmp_path)
    assert moelab.load(tmp_path).config.rope_scaling == cfg.rope_scaling
