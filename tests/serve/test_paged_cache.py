"""The paged cache against the dense one: the same logits for prefill (also chunked) and for batched decode
over sequences of different lengths, for MLA (latent + RoPE key) and MHA (K/V); blocks booked, taken and
returned exactly."""

from __future__ import annotations

import pytest
import torch

from moelab.model.transformer import DeepSeekForCausalLM
from moelab.serve.paged_cache import BlockPool, PagedBatch, PagedSequence


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_paged_cache_gives_the_dense_cache_logits(tiny_config, attention):
    cfg = tiny_config() if attention == "mla" else tiny_config(use_mla=False, num_key_value_heads=1)
    model = DeepSeekForCausalLM.from_config(cfg, seed=1).eval()
    pool = BlockPool.for_model(model, budget_tokens=128, block_size=4)
    prompts = [torch.randint(8, cfg.vocab_size, (n,)) for n in (7, 2, 11)]
    steps = 3
    seqs, dense, dense_logits = [], [], []
    with torch.inference_mode():
        for p in prompts:
            seq = PagedSequence(reserved=pool.blocks_for(len(p) + steps))
            assert pool.reserve(seq.reserved)
            for start in range(0, len(p), 5):        # chunked prefill: positions continue across chunks
                view = PagedBatch(pool, [seq], len(p[start:start + 5]))
                paged = model(p[None, start:start + 5], cache=view).logits
                view.commit()
            cache = model.new_cache()
            ref = model(p[None], cache=cache).logits
            torch.testing.assert_close(paged[0, -1], ref[0, -1], rtol=1e-5, atol=1e-5)
            seqs.append(seq)
            dense.append(cache)
            dense_logits.append(ref[0, -1])
        for _ in range(steps):                       # batched decode of three sequences of different lengths
            nxt = torch.stack([lg.argmax() for lg in dense_logits])[:, None]              # [B, 1]
            view = PagedBatch(pool, seqs, 1)
            paged = model(nxt, attention_mask=view.padding(), position_ids=view.positions(), cache=view).logits
            view.commit()
            for b, cache in enumerate(dense):
                dense_logits[b] = model(nxt[b:b + 1], cache=cache).logits[0, -1]
                torch.testing.assert_close(paged[b, -1], dense_logits[b], rtol=1e-5, atol=1e-5)
    assert [s.length for s in seqs] == [len(p) + steps for p in prompts]


def test_blocks_are_booked_taken_and_returned(tiny_config):
    model = DeepSeekForCausalLM.from_config(tiny_config(), seed=0)
    pool = BlockPool.for_model(model, budget_tokens=40, block_size=8)        # 5 blocks
    assert pool.num_blocks == 5 and pool.blocks_for(17) == 3
    assert pool.reserve(3) and not pool.reserve(3) and pool.reserve(2)
    a, b = PagedSequence(reserved=3), PagedSequence(reserved=2)
    a.grow(pool, 17)
    assert len(a.blocks) == 3 and pool.used == 3 and 0 not in a.blocks     # block 0 is the padding block
    b.grow(pool, 8)
    assert pool.used == 4
    pool.copy_blocks(a.blocks[:1], b.blocks[:1])
    for bufs in pool.layers:
        assert torch.equal(bufs[0][a.blocks[0]], bufs[0][b.blocks[0]])
    a.release(pool)
    assert pool.used == 1 and pool.reserved == 2
    b.release(pool)
    assert pool.used == 0 and pool.reserved == 0
    with pytest.raises(Exception, match="booked"):
        PagedSequence(reserved=1).grow(pool, 9)
