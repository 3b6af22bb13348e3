"""RoPE and YaRN: relative-position invariance, layout equivalence, docs/methods.md §4 worked values,
and inv_freq against transformers' own YaRN implementation."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config import make_config, yarn_mscale
from moelab.model.rope import (
    RotaryEmbedding,
    apply_rope,
    default_inv_freq,
    rotate,
    yarn_correction_range,
    yarn_inv_freq,
)


def rope_cfg(**kw):
    base = dict(vocab_size=64, hidden_size=64, num_attention_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=64,
                v_head_dim=16, kv_lora_rank=32, n_routed_experts=0, first_k_dense_replace=0, intermediate_size=64)
    return make_config(base | kw)


def score(q, k, pq, pk, rope, interleave):
    cos_q, sin_q = rope(torch.tensor([[pq]]))
    cos_k, sin_k = rope(torch.tensor([[pk]]))
    return (apply_rope(q, cos_q, sin_q, interleave) * apply_rope(k, cos_k, sin_k, interleave)).sum()


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("yarn", [False, True])
def test_scores_depend_only_on_relative_position(interleave, yarn):
    kw = {"rope_scaling": {"factor": 40.0, "original_max_position_embeddings": 4096}} if yarn else {}
    rope = RotaryEmbedding(rope_cfg(**kw)).double()
    rope.inv_freq = rope.inv_freq.double()
    q, k = torch.randn(1, 1, 64, dtype=torch.float64), torch.randn(1, 1, 64, dtype=torch.float64)
    base = score(q, k, 7, 3, rope, interleave)
    for shift in (1, 100, 5000):
        assert score(q, k, 7 + shift, 3 + shift, rope, interleave).item() == pytest.approx(base.item(), rel=1e-9)
    assert abs(score(q, k, 8, 3, rope, interleave).item() - base.item()) > 1e-6  # but not of absolute shift


def test_interleaved_and_half_layouts_give_equal_scores():
    rope = RotaryEmbedding(rope_cfg())
    q, k = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    deinterleave = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])
    cos, sin = rope(torch.arange(5)[None])
    a = (apply_rope(q, cos, sin, True) * apply_rope(k, cos, sin, True)).sum(-1)
    b = (apply_rope(q[..., deinterleave], cos, sin, False) * apply_rope(k[..., deinterleave], cos, sin, False)).sum(-1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def reference_rotation(x, cos, sin, interleave):
    """The pairwise formula as the reference code writes it: (x1·c − x2·s, x2·c + x1·s), tables in x's dtype."""
    c = cos.reshape(*cos.shape[:2], *([1] * (x.dim() - cos.dim())), cos.shape[-1]).to(x.dtype)
    s = sin.reshape(*sin.shape[:2], *([1] * (x.dim() - sin.dim())), sin.shape[-1]).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
def test_table_rotation_is_bit_identical_to_the_pairwise_formula(dtype, interleave):
    """The model's four-op rotation (full tables made once per forward) rounds exactly as the reference's
    pairwise formula: equal bit for bit, per-head queries [B, T, N, D] and shared keys [B, T, D] alike."""
    rope = RotaryEmbedding(rope_cfg(rope_interleave=interleave))
    positions = torch.randint(0, 5000, (3, 7))
    cos, sin = rope(positions)
    C, S = rope.tables(positions, dtype)
    assert C.shape == S.shape == (3, 7, 64) and C.dtype == S.dtype == dtype
    for x in (torch.randn(3, 7, 4, 64, dtype=dtype), torch.randn(3, 7, 64, dtype=dtype)):
        assert torch.equal(rotate(x, C, S, interleave), reference_rotation(x, cos, sin, interleave))
        assert torch.equal(apply_rope(x, cos, sin, interleave), reference_rotation(x, cos, sin, interleave))


def test_released_yarn_worked_values():
    # s = 40, L_orig = 4096, beta_fast 32, beta_slow 1, theta 1e4, d = 64 -> low 10, high 23 (docs/methods.md §4)
    assert yarn_correction_range(64, 1e4, 4096, 32, 1) == (10, 23)
    assert yarn_mscale(40, 0.707) == pytest.approx(1.26080, abs=5e-6)
    assert yarn_mscale(40, 0.707) ** 2 == pytest.approx(1.5896, abs=1e-4)
    assert yarn_mscale(40, 1.0) ** 2 == pytest.approx(1.8739, abs=1e-4)
    assert yarn_mscale(1.0, 0.707) == 1.0
    v2 = rope_cfg(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling={
        "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 0.707})
    assert v2.softmax_scale == pytest.approx(192 ** -0.5 * 1.5896, rel=1e-4)
    rope = RotaryEmbedding(v2)
    assert rope.attention_scaling == 1.0  # mscale == mscale_all_dim: cos/sin factor 1
    inv, base = rope.inv_freq, default_inv_freq(64, 1e4)
    torch.testing.assert_close(inv[:10], base[:10])            # below low: kept (extrapolation)
    torch.testing.assert_close(inv[23:], base[23:] / 40)      # above high: fully interpolated
    assert ((inv[11:23] < base[11:23]) & (inv[11:23] > base[11:23] / 40)).all()  # ramp in between


def test_yarn_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for factor, orig, dim in ((40.0, 4096, 64), (4.0, 64, 8), (16.0, 2048, 32)):
        hf_cfg = transformers.DeepseekV3Config(
            qk_rope_head_dim=dim, max_position_embeddings=int(orig * factor),
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
                             "original_max_position_embeddings": orig, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 0.707, "mscale_all_dim": 0.707})
        ref, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
        ours = yarn_inv_freq(dim, 10000.0, factor, orig, 32, 1)
        torch.testing.assert_close(ours, ref.float(), atol=1e-7, rtol=0)
        assert ref_scale == pytest.approx(1.0)


def test_cos_sin_factor_when_mscales_differ():
    cfg = rope_cfg(rope_scaling={"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                                 "mscale_all_dim": 0.0})
    # hub V2 code: mscale(s, 1) / mscale(s, 0) = 0.1 ln 40 + 1
    assert RotaryEmbedding(cfg).attention_scaling == pytest.approx(0.1 * math.log(40) + 1)


def test_yarn_apply_setting():
    kw = {"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 4096}, "max_position_embeddings": 4096}
    assert rope_cfg(**kw).yarn_active
    assert not rope_cfg(**kw, yarn_apply="when_longer").yarn_active
    assert rope_cfg(**(kw | {"max_position_embeddings": 16384}), yarn_apply="when_longer").yarn_active


def test_rope_tables_stay_fp32_in_a_bf16_model():
    from moelab.model.transformer import DeepSeekForCausalLM

    cfg = rope_cfg(qk_rope_head_dim=16)
    model = DeepSeekForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    inv = model.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32
    torch.testing.assert_close(inv, default_inv_freq(16, 1e4), atol=0, rtol=0)
