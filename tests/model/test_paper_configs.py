"""The shipped paper configs (configs/*.toml) against the numbers their papers publish.

Parameters are counted by :func:`moelab.model.accounting.model_budget` on the meta device, so even
DeepSeek-V3 takes well under a second. Sources of every number are in each TOML's header comment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.config import ModelConfig, load_model_config
from moelab.model.accounting import ModelBudget, model_budget

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _load(name: str) -> ModelConfig:
    return load_model_config(CONFIGS / f"{name}.toml")


def _budget(name: str) -> ModelBudget:
    return model_budget(_load(name))


# --- every config loads and says what its header says -------------------------------------------

ALL = ["deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "deepseekmoe-2b", "deepseekmoe-16b",
       "lfb-1b", "lfb-3b", "deepseek-vl2-tiny-lm", "deepseek-coder-v2-lite", "deepseek-coder-v2"]


@pytest.mark.parametrize("name", ALL)
def test_config_loads(name):
    cfg = _load(name)
    assert cfg.is_moe
    b = model_budget(cfg)
    assert b.moe_layers + b.dense_layers == cfg.num_hidden_layers
    assert b.dense_layers == cfg.first_k_dense_replace


def test_v2_lite_has_no_query_compression():
    """config.json ``"q_lora_rank": null``, written as 0 in the TOML (no null there)."""
    assert _load("deepseek-v2-lite").q_lora_rank is None
    assert _load("deepseek-v2").q_lora_rank == 1536


# --- total / activated parameters against the papers ---------------------------------------------

@pytest.mark.parametrize("name,total,activated", [
    ("deepseek-v2", 236e9, 21e9),        # DeepSeek-V2 abstract: 236B total, 21B activated
    ("deepseek-v3", 671e9, 37e9),        # DeepSeek-V3 abstract: 671B total, 37B activated
    ("deepseekmoe-16b", 16.4e9, 2.8e9),  # DeepSeekMoE §5: 16.4B total, 2.8B activated
    ("deepseek-coder-v2", 236e9, 21e9),  # DeepSeek-Coder-V2 Table 1: 236B total, 21B active
])
def test_total_and_activated(name, total, activated):
    b = _budget(name)
    assert b.total_params == pytest.approx(total, rel=0.02)
    assert b.activated_params == pytest.approx(activated, rel=0.02)


def test_v2_lite_total():
    """DeepSeek-V2 App. B: 15.7B total (moelab: 15.706B)."""
    assert _budget("deepseek-v2-lite").total_params == pytest.approx(15.7e9, rel=0.02)


@pytest.mark.xfail(strict=True, reason="V2-Lite activated params: moelab counts 2.661B (input embedding and "
                   "LM head included, as for V2/V3/DeepSeekMoE-16B, which all match), the paper says 2.4B "
                   "(+10.9%). No single embedding convention fits: without both embeddings 2.242B (-6.6%), "
                   "without the LM head only 2.451B (+2.1%)")
def test_v2_lite_activated():
    assert _budget("deepseek-v2-lite").activated_params == pytest.approx(2.4e9, rel=0.02)


def test_coder_v2_lite_total():
    """DeepSeek-Coder-V2 Table 1: 16B total (moelab: 15.706B, -1.8%; V2-Lite's architecture)."""
    assert _budget("deepseek-coder-v2-lite").total_params == pytest.approx(16e9, rel=0.02)
    assert _budget("deepseek-coder-v2-lite") == _budget("deepseek-v2-lite")


@pytest.mark.xfail(strict=True, reason="Coder-V2-Lite activated params: 2.661B against Table 1's 2.4B, the same "
                   "embedding-convention gap as V2-Lite's (see test_v2_lite_activated)")
def test_coder_v2_lite_activated():
    assert _budget("deepseek-coder-v2-lite").activated_params == pytest.approx(2.4e9, rel=0.02)


def test_v2_lite_activated_counts():
    """Pin the V2-Lite numbers quoted in the xfail above (routed: 6 of 64 experts in 26 MoE layers)."""
    b = _budget("deepseek-v2-lite")
    assert b.activated_params == pytest.approx(2.661e9, rel=1e-3)
    assert b.activated_params - b.embedding_params == pytest.approx(2.242e9, rel=1e-3)


def test_deepseekmoe_2b():
    """DeepSeekMoE §4 / Tables 1-2: 2.0B total, 0.3B activated; experts 1.89B total / 0.24B activated.

    The expert width (853) is inferred (see the TOML); totals land at 1.967B (-1.6%) and expert
    params at 1.887B / 0.236B. "0.3B" activated is rounded to one decimal (moelab: 0.317B, with
    embeddings; 0.296B without), so it is checked to +-0.05B rather than 2%.
    """
    cfg = _load("deepseekmoe-2b")
    b = model_budget(cfg)
    assert b.total_params == pytest.approx(2.0e9, rel=0.02)
    assert b.activated_params == pytest.approx(0.3e9, abs=0.05e9)
    # shared experts are n_shared routed-expert-sized SwiGLUs: derive their count from the routed ones
    shared = b.routed_expert_params * cfg.n_shared_experts // cfg.n_routed_experts
    assert b.routed_expert_params + shared == pytest.approx(1.89e9, rel=0.02)
    assert b.activated_routed_expert_params + shared == pytest.approx(0.24e9, rel=0.02)


def test_lfb_1b():
    """LFB (arXiv 2408.15664) Table 5 "1B": only a size label; expert width is not published.

    With the inferred widths (experts 512, dense 2731) the model has 1.051B parameters, 5.1% above
    1.0B, so 2% cannot hold; 6% is the tolerance this inference supports.
    """
    assert _budget("lfb-1b").total_params == pytest.approx(1.0e9, rel=0.06)


def test_lfb_3b():
    """LFB Table 5 "3B" (a size label): the inferred widths (experts 1024, dense 4096) give 3.032B."""
    assert _budget("lfb-3b").total_params == pytest.approx(3.0e9, rel=0.02)


def test_vl2_tiny_lm():
    """DeepSeek-VL2 Table 1: VL2-Tiny is 3.37B in all. INFERENCE: its LM (2.935B here) plus a ~0.43B
    SigLIP-SO400M vision tower and adaptor; checked loosely (3%) since the vision part is estimated."""
    cfg = _load("deepseek-vl2-tiny-lm")
    assert not cfg.use_mla and not cfg.rope_interleave
    assert _budget("deepseek-vl2-tiny-lm").total_params == pytest.approx(3.37e9 - 0.43e9, rel=0.03)


# --- decoding cache per token per layer (DeepSeek-V2 Table 1, docs/methods.md §4) -----------------------

@pytest.mark.parametrize("name,mha_per_layer,ratio", [
    ("deepseek-v3", 40960, 71.1),   # 128 heads x (192 + 128)
    ("deepseek-v2", 40960, 71.1),
    ("deepseek-v2-lite", 5120, 8.9),  # 16 heads x (192 + 128)
])
def test_mla_cache(name, mha_per_layer, ratio):
    cfg = _load(name)
    b = model_budget(cfg)
    L = cfg.num_hidden_layers
    assert b.cache_elems_per_token == 576 * L  # kv_lora_rank 512 + RoPE key 64
    assert b.mha_cache_elems_per_token == mha_per_layer * L
    assert b.mha_cache_elems_per_token / b.cache_elems_per_token == pytest.approx(ratio, abs=0.05)
    assert b.cache_bytes_per_token == 2 * b.cache_elems_per_token  # bf16


# --- DeepSeek LLM FLOPs formula: M = 72·L·d² + 12·L·d·l_seq, l_seq = 4096 (docs/methods.md §10, Table 3) ----

@pytest.mark.parametrize("layers,hidden,flops", [
    (8, 512, 352e6),
    (12, 768, 963e6),
    (24, 1024, 3.02e9),
    (24, 2048, 9.66e9),
    (32, 4096, 45.1e9),
    (40, 5120, 85.6e9),
    (80, 8192, 419e9),
])
def test_deepseek_llm_flops(layers, hidden, flops):
    cfg = ModelConfig(num_hidden_layers=layers, hidden_size=hidden, n_routed_experts=0,
                      num_attention_heads=max(1, hidden // 128), intermediate_size=8 * hidden // 3)
    assert not cfg.is_moe
    b = model_budget(cfg, seq_len=4096)
    assert b.seq_len == 4096
    assert b.flops_per_token == pytest.approx(flops, rel=0.01)
