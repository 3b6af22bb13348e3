"""The captured (CUDA graph) and compiled decode steps against the eager ones, on the GPU (marker ``cuda``).

``MOELAB_TEST_DEVICE=cpu pytest -m cuda`` dry-runs them on the CPU: there is no graph there, and the compiled
step is traced with dynamo's ``eager`` backend instead of inductor (seconds instead of a minute)."""

from __future__ import annotations

import pytest
import torch
from decode_steps import assert_logits_close, step_logits

from moelab.infer import generate
from moelab.model.transformer import DeepSeekForCausalLM

pytestmark = pytest.mark.cuda


def build(tiny_config, device, dtype=torch.float32, **kw) -> DeepSeekForCausalLM:
    cfg = tiny_config(num_hidden_layers=3, first_k_dense_replace=1, **kw)
    return DeepSeekForCausalLM.from_config(cfg, seed=0).to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "compile+graph"])
def test_graphed_step_matches_eager(gpu, tiny_config, compiled):
    """Batch 1 (N·K < E: the experts' few-token kernel, no host sync): the whole step is one graph."""
    cuda = gpu.type == "cuda"
    model = build(tiny_config, gpu)
    ids = torch.randint(2, 320, (1, 9), device=gpu)
    ref = generate(model, ids, 12, decode="dynamic")
    if cuda or not compiled:    # (generate compiles with inductor: on the CPU the slow CPU test covers it)
        report = {}
        mode = ("compile" if compiled else "graph") if cuda else "static"
        assert generate(model, ids, 12, decode=mode, report=report).tolist() == ref.tolist()
        assert report["graph"] is cuda and report["not_graphed"] is None
    feed = ref[:, 9:-1]
    decoders = []
    got = step_logits(model, ids, feed, static=True, decoders=decoders, graph=cuda, compile=compiled,
                      backend="inductor" if cuda else "eager")
    assert (decoders[0].graph is not None) is cuda
    assert_logits_close(got, step_logits(model, ids, feed, static=True), atol=1e-4 if compiled else 1e-5)
    assert_logits_close(got, step_logits(model, ids, feed), atol=1e-4)


def test_bf16_graph_matches_eager_static(gpu, tiny_config):
    model = build(tiny_config, gpu, torch.bfloat16)
    ids = torch.randint(2, 320, (1, 16), device=gpu)
    feed = generate(model, ids, 10, decode="static")[:, 16:-1]
    got = step_logits(model, ids, feed, static=True, graph=gpu.type == "cuda")
    assert_logits_close(got, step_logits(model, ids, feed, static=True), atol=2e-2)


def test_a_step_that_syncs_runs_eagerly(gpu, tiny_config):
    """Batch 4 routes N·K = 8 = E rows: a grouped expert kernel runs, and it reads row counts back to the host,
    so the step is not captured; generation falls back to eager static steps with the same tokens."""
    cuda = gpu.type == "cuda"
    model = build(tiny_config, gpu)
    ids = torch.randint(2, 320, (4, 7), device=gpu)
    ref = generate(model, ids, 8, decode="dynamic")
    report = {}
    assert generate(model, ids, 8, decode="graph" if cuda else "static", report=report).tolist() == ref.tolist()
    if cuda:
        assert report["graph"] is False and "synchronises with the host" in report["not_graphed"]
