"""MLA: absorbed == naive over prefill + decode, exact cache size, cache/mask consistency."""

from __future__ import annotations

import pytest
import torch

from moelab.config import make_config
from moelab.infer import SamplingConfig, generate
from moelab.model.transformer import DeepSeekForCausalLM

# docs/methods.md §4 check shape: d 64, n_h 4, nope 16, rope 8, v 16, d_c 32.
MLA = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=32, q_lora_rank=48,
           n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
           first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
           initializer_range=0.1, max_position_embeddings=512)


def model_pair(**kw):
    cfg = make_config(MLA | kw)
    naive = DeepSeekForCausalLM.from_config(cfg.model_copy(update={"attn_impl": "naive"}), seed=0)
    absorb = DeepSeekForCausalLM.from_config(cfg.model_copy(update={"attn_impl": "absorb"}), seed=0)
    return naive.eval(), absorb.eval()


@torch.no_grad()
def test_auto_uses_both_paths_and_matches():
    cfg = make_config(MLA)
    auto = DeepSeekForCausalLM.from_config(cfg, seed=0).eval()
    naive, _ = model_pair()
    assert cfg.attn_impl == "auto"
    ids = torch.randint(0, 97, (2, 12))
    cache = auto.new_cache()
    torch.testing.assert_close(auto(ids[:, :8], cache=cache).logits, naive(ids[:, :8]).logits, atol=1e-5, rtol=0)
    for t in range(8, 12):
        torch.testing.assert_close(auto(ids[:, t:t + 1], cache=cache).logits[:, 0], naive(ids[:, :t + 1]).logits[:, -1],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None},
                                {"rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 64,
                                                  "mscale": 0.707, "mscale_all_dim": 0.707}}])
@torch.no_grad()
def test_absorbed_equals_naive_prefill_and_16_decode_steps(kw):
    naive, absorb = model_pair(**kw)
    ids = torch.randint(0, 97, (2, 30))
    full = naive(ids).logits                                   # no cache at all: the reference
    c_n, c_a = naive.new_cache(), absorb.new_cache()
    prefill = 14
    torch.testing.assert_close(absorb(ids[:, :prefill], cache=c_a).logits, full[:, :prefill], atol=1e-5, rtol=0)
    torch.testing.assert_close(naive(ids[:, :prefill], cache=c_n).logits, full[:, :prefill], atol=1e-5, rtol=0)
    for t in range(prefill, prefill + 16):
        a = absorb(ids[:, t:t + 1], cache=c_a).logits[:, 0]
        n = naive(ids[:, t:t + 1], cache=c_n).logits[:, 0]
        torch.testing.assert_close(a, n, atol=1e-5, rtol=0)
        torch.testing.assert_close(a, full[:, t], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cache_holds_only_latent_and_rope_key():
    _, absorb = model_pair()
    cache = absorb.new_cache()
    absorb(torch.randint(0, 97, (3, 9)), cache=cache)
    cfg = absorb.config
    assert cache.seq_len == 9
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim                     # 32 + 8 = 40
    assert cache.elems_per_token() == per_layer * cfg.num_hidden_layers
    assert cache.elems_per_token() == cfg.cache_elems_per_token()
    (kv,) = cache.layer_tensors(0)                                          # [c_KV | k_pe] side by side
    assert kv.shape == (3, 9, 40)
    c_kv = kv[..., :32]
    # the cached latent is the normalised one: RMS of each row equals the norm weight (ones) scale
    rms = c_kv.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


@torch.no_grad()
def test_mha_gqa_cache_and_decode():
    cfg = make_config(MLA | dict(use_mla=False, num_attention_heads=4, num_key_value_heads=2, rope_interleave=False))
    model = DeepSeekForCausalLM.from_config(cfg, seed=0).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = model.new_cache()
    model(ids[:, :8], cache=cache)
    for t in range(8, 12):
        torch.testing.assert_close(model(ids[:, t:t + 1], cache=cache).logits[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert cache.elems_per_token() == 2 * 2 * 16 * cfg.num_hidden_layers == cfg.cache_elems_per_token()


@torch.no_grad()
def test_chunked_prefill_and_left_padded_batch_match_single_sequences():
    _, model = model_pair()
    a, b = torch.randint(2, 97, (1, 11)), torch.randint(2, 97, (1, 6))
    greedy = SamplingConfig(greedy=True)
    ref_a = generate(model, a, 10, greedy)
    ref_b = generate(model, b, 10, greedy)
    assert generate(model, a, 10, greedy, prefill_chunk=4).tolist() == ref_a.tolist()
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = generate(model, batch, 10, greedy, attention_mask=mask)
    assert out[0].tolist() == ref_a[0].tolist()
    assert out[1, 5:].tolist() == ref_b[0].tolist()
