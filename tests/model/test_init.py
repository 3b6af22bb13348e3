"""Seeded initialisation: the same seed gives the same weights, and the global random state (CPU and the
model's GPU) is left as it was, so building a model never changes what a caller draws next."""

from __future__ import annotations

import torch
from tiny import TINY_MOE

from moelab.config import make_config
from moelab.model.transformer import DeepSeekForCausalLM


def test_seeded_init_is_repeatable_and_leaves_the_random_state(cpu_and_gpu):
    device = cpu_and_gpu
    cpu_before = torch.random.get_rng_state()
    gpu_before = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    a = DeepSeekForCausalLM.from_config(make_config(TINY_MOE), seed=3, device=device)
    b = DeepSeekForCausalLM.from_config(make_config(TINY_MOE), seed=3, device=device)
    c = DeepSeekForCausalLM.from_config(make_config(TINY_MOE), seed=4, device=device)
    assert torch.equal(torch.random.get_rng_state(), cpu_before)
    if gpu_before is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), gpu_before)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), name
        if p.std() > 0:
            assert not torch.equal(p, r), name


def test_a_padding_mask_on_another_device_than_the_ids(cpu_and_gpu):
    """The left-padding mask may come from the host while the ids are on the GPU."""
    model = DeepSeekForCausalLM.from_config(make_config(TINY_MOE), seed=0, device=cpu_and_gpu).eval()
    ids = torch.randint(0, 320, (2, 6), device=cpu_and_gpu)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        ref = model(ids, attention_mask=mask.to(cpu_and_gpu)).logits
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
