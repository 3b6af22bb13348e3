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
