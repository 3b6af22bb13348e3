"""The whole model traces under dynamo as one graph, on the path a GPU runs (bf16, expert groups not
aligned): no ``.item()``, ``int(tensor)``, data-dependent shape or unsupported op. On a GPU each such break
would be a host sync (the device idles while Python waits) or a compiled region cut in two; the CPU proves
the code has none before GPU time is spent on it."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_MOE

from moelab.config import make_config
from moelab.model import experts as ex
from moelab.model.transformer import DeepSeekForCausalLM


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_model_traces_as_one_graph(monkeypatch, impl, training):
    monkeypatch.setattr(ex, "LOWP_CPU_ALIGN", 1)          # CUDA's grouping (the CPU aligns bf16 groups)
    model = DeepSeekForCausalLM.from_config(make_config(TINY_MOE | {"expert_impl": impl}), seed=0)
    model = model.train(training).to(torch.bfloat16)
    ids = torch.randint(0, 320, (4, 64))                  # 256 tokens: every MoE layer routes N·K ≥ E rows
    with torch.set_grad_enabled(training):
        model(ids)                                        # eager first: the kernel probe and choice
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [
        str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
def test_fp32_experts_run_eagerly_between_compiled_graphs(impl):
    """grouped_mm's compile-time rule takes only bf16 (its CPU kernel runs fp32): compiled fp32 code runs
    the routed experts eagerly, one graph break per MoE layer, and computes what eager code does."""
    model = DeepSeekForCausalLM.from_config(make_config(TINY_MOE | {"expert_impl": impl}), seed=0).train()
    ids = torch.randint(0, 320, (2, 32))
    eager = model(ids).logits
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    n_moe = sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert len(reasons) == n_moe > 0 and all("RoutedExperts._eager_run" in r for r in reasons), reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")(ids).logits
    compiled.float().square().mean().backward()
    assert all(p.grad is not None for p in model.model.layers[-1].mlp.experts.parameters())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
