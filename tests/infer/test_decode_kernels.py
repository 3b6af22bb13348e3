"""Kernels per decode step: a budget that keeps the eager step lean.

At batch 1 on a GPU a decode step is bound by how many kernels it launches (each costs microseconds
however little it does, even replayed from a CUDA graph), so the count is a speed property that the CPU
can check exactly: the same ops run there. Counted with ``benchmarks/decode_ops.py``'s own counter over
DeepSeek-V2-Lite's layer types (MLA without q LoRA, softmax greedy routing, 2 shared experts) at narrow
widths. The budgets are today's counts plus a little slack for other torch versions; a change that adds
kernels to every layer fails here and says which ops grew.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moelab.infer.generate import generate
from moelab.model import experts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def decode_ops():
    spec = importlib.util.spec_from_file_location("decode_ops", ROOT / "benchmarks" / "decode_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_step(decode_ops, model, ids) -> dict[str, float]:
    """Top-level ops of one decode step by name: (10 new tokens − 2 new tokens) / 8."""
    short, long = decode_ops.ops(model, ids, 2, "static"), decode_ops.ops(model, ids, 10, "static")
    return {k: (long[k] - short.get(k, 0)) / 8 for k in long if long[k] > short.get(k, 0)}


@pytest.mark.parametrize("batch, budget", [(1, 43), (32, 50)])
def test_decode_step_stays_within_its_kernel_budget(decode_ops, monkeypatch, batch, budget):
    monkeypatch.setattr(experts, "LOWP_CPU_ALIGN", 1)   # group experts as CUDA does
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    model = decode_ops.build(scale_down=16, layers=4)   # 1 dense + 3 MoE layers, as V2-Lite's first four
    ids = torch.randint(2, 4096, (batch, 8))
    generate(model, ids, 2, decode="static")              # warm-up
    ops = per_step(decode_ops, model, ids)
    L = model.config.num_hidden_layers
    # what the model's layers issue, without the step's fixed cost (rope tables, sampling: ~25 ops)
    layers = sum(ops.values()) - 25
    assert layers / L <= budget, f"{layers / L:.1f} ops per layer > {budget}: {sorted(ops.items())}"
    # the lean forms this budget rests on: no gather after the router's top-k (no bias), one rotation
    # for the query's and the key's rope parts, the few-token experts' gate in one multiply
    assert ops.get("aten::gather", 0) == 0
    assert ops.get("aten::flip", 0) == L                   # interleaved rope: one flip per rotation
    assert ops.get("cast", 0) <= 2 * L + 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_token_gating_is_bitwise_the_cast_multiply_cast_it_replaced(dtype):
    """Under autocast the expert outputs are bf16 while x (fp32 activations) sets the result's dtype."""
    from moelab.config import make_config
    from moelab.model.experts import RoutedExperts

    cfg = make_config(dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32))
    torch.manual_seed(0)
    layer = RoutedExperts(cfg)
    layer.reset_parameters(0.02)
    layer = layer.to(dtype)
    x, idx, gates = torch.randn(2, 64, dtype=dtype), torch.tensor([[0, 3, 5, 9], [1, 3, 7, 15]]), torch.rand(2, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer._few_tokens(x, idx, gates)
        h = torch.bmm(x.repeat_interleave(4, 0)[:, None], layer.gate_up_proj[idx.reshape(-1)].transpose(1, 2))
        a = torch.nn.functional.silu(h[..., :32]) * h[..., 32:]
        y = torch.bmm(a, layer.down_proj[idx.reshape(-1)].transpose(1, 2)).view(2, 4, -1)
        ref = (y.to(torch.float32) * gates[..., None]).to(x.dtype).sum(dim=1)
    assert out.dtype == x.dtype
    assert torch.equal(out, ref)
