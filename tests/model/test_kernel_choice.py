"""Which routed-expert kernel runs (moelab.model.experts.choose_kernel) as a table, and how a
substitution is logged. Every row is a branch of the choice; the default row (E=16 experts, N=40
tokens, K=4, H=32, I=8, grad on, grouped_mm present) lets every requested kernel run."""

from __future__ import annotations

import logging

import pytest
import torch

from moelab.config import make_config
from moelab.model import experts as ex
from moelab.model import kernel_choice as kc

bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
NO_OP = "this torch has no grouped_mm"
DEFAULT = dict(device_type="cpu", dtype=fp32, grad_enabled=True, n_tokens=40, n_routed=160, n_experts=16,
               hidden=32, inner=8, grouped_mm_missing=None)

# (requested, changes to DEFAULT, kernel that runs, a word of the reason or None when it runs as asked)
TABLE = [
    # decode steps: N·K < E without autograd takes the gathered-weights path, whatever was asked
    *[(req, dict(n_tokens=3, n_routed=12, grad_enabled=False), "few_tokens", "decoding") for req in ex.KERNELS],
    ("fused", dict(device_type="cuda", dtype=fp16, n_tokens=1, n_routed=4, grad_enabled=False), "few_tokens",
     "decoding"),
    ("fused", dict(n_tokens=0, n_routed=0, grad_enabled=False), "few_tokens", "decoding"),
    ("fused", dict(n_tokens=3, n_routed=12, grad_enabled=True), "fused", None),        # autograd on
    ("fused", dict(n_tokens=4, n_routed=16, grad_enabled=False), "fused", None),       # N·K == E: not fewer
    ("loop", dict(n_tokens=3, n_routed=12, grad_enabled=True), "loop", None),
    # loop and padded_bmm always run as asked
    ("loop", dict(), "loop", None),
    ("loop", dict(device_type="cuda", dtype=fp16, hidden=36, grouped_mm_missing=NO_OP), "loop", None),
    ("loop", dict(grad_enabled=False), "loop", None),
    ("padded_bmm", dict(), "padded_bmm", None),
    ("padded_bmm", dict(device_type="cuda", dtype=fp32, grouped_mm_missing=NO_OP), "padded_bmm", None),
    ("padded_bmm", dict(n_tokens=0, n_routed=0), "padded_bmm", None),
    # grouped_mm: runs where grouped_mm takes the operands, else the loop (on any device)
    ("grouped_mm", dict(), "grouped_mm", None),
    ("grouped_mm", dict(dtype=bf16), "grouped_mm", None),
    ("grouped_mm", dict(dtype=fp16), "grouped_mm", None),                               # CPU: any dtype
    ("grouped_mm", dict(dtype=fp64, hidden=34, inner=6), "grouped_mm", None),          # 16-byte rows in fp64
    ("grouped_mm", dict(device_type="cuda", dtype=bf16), "grouped_mm", None),
    ("grouped_mm", dict(device_type="cuda", dtype=fp16), "loop", "bfloat16"),
    ("grouped_mm", dict(device_type="cuda", dtype=fp32), "loop", "bfloat16"),
    ("grouped_mm", dict(grouped_mm_missing=NO_OP), "loop", "no grouped_mm"),
    ("grouped_mm", dict(device_type="cuda", dtype=bf16, grouped_mm_missing=NO_OP), "loop", "no grouped_mm"),
    ("grouped_mm", dict(hidden=34), "loop", "16-byte"),                                # 136-byte rows
    ("grouped_mm", dict(inner=6), "loop", "16-byte"),                                  # 24-byte rows
    ("grouped_mm", dict(dtype=bf16, hidden=36), "loop", "16-byte"),                    # 72 bytes in bf16...
    ("grouped_mm", dict(dtype=fp32, hidden=36), "grouped_mm", None),                   # ...144 in fp32
    ("grouped_mm", dict(device_type="cuda", dtype=bf16, inner=12), "loop", "16-byte"),
    ("grouped_mm", dict(n_tokens=0, n_routed=0), "loop", "no routed rows"),
    # fused: runs where grouped_mm takes x; else the padded bmm on CUDA, the loop elsewhere
    ("fused", dict(), "fused", None),
    ("fused", dict(dtype=bf16), "fused", None),
    ("fused", dict(device_type="cuda", dtype=bf16), "fused", None),
    ("fused", dict(device_type="mps"), "fused", None),                                 # the dtype rule is CUDA's
    ("fused", dict(device_type="cuda", dtype=fp16), "padded_bmm", "bfloat16"),
    ("fused", dict(device_type="cuda", dtype=fp32), "padded_bmm", "bfloat16"),         # e.g. fp32 under autocast
    ("fused", dict(device_type="cuda", dtype=bf16, grouped_mm_missing=NO_OP), "padded_bmm", "no grouped_mm"),
    ("fused", dict(device_type="cuda", dtype=bf16, hidden=36), "padded_bmm", "16-byte"),
    ("fused", dict(device_type="cuda", dtype=bf16, n_tokens=0, n_routed=0), "padded_bmm", "no routed rows"),
    ("fused", dict(grouped_mm_missing=NO_OP), "loop", "no grouped_mm"),
    ("fused", dict(dtype=bf16, inner=12), "loop", "16-byte"),
    ("fused", dict(n_tokens=0, n_routed=0), "loop", "no routed rows"),
    ("fused", dict(device_type="mps", hidden=34), "loop", "16-byte"),
]


@pytest.mark.parametrize("requested,changes,kernel,why", TABLE)
def test_kernel_choice_table(requested, changes, kernel, why):
    choice = ex.choose_kernel(requested, **(DEFAULT | changes))
    assert choice.kernel == kernel
    if why is None:
        assert choice.reason is None
    else:
        assert why in choice.reason


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown expert kernel 'bmm'"):
        ex.choose_kernel("bmm", **DEFAULT)


BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
            n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, moe_intermediate_size=8,
            first_k_dense_replace=0)


def _experts(impl: str) -> ex.RoutedExperts:
    m = ex.RoutedExperts(make_config(BASE | {"expert_impl": impl}))
    m.reset_parameters(0.3)
    return m


def _inputs(n_tokens: int):
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(n_tokens)])
    return torch.randn(n_tokens, 32), idx, torch.rand(n_tokens, 4)


@pytest.mark.parametrize("impl,ran", [("fused", "_loop"), ("grouped_mm", "_loop"), ("loop", "_loop"),
                                      ("padded_bmm", "_padded")])
def test_forward_runs_the_chosen_kernel(monkeypatch, impl, ran):
    """The module follows the table: without grouped_mm both grouped requests run the loop on the CPU."""
    monkeypatch.setattr(ex, "grouped_mm", None)
    m = _experts(impl)
    calls = []
    orig = getattr(m, ran)
    monkeypatch.setattr(m, ran, lambda *a: calls.append(1) or orig(*a))
    m(*_inputs(8))
    assert calls == [1]


def test_substitution_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(kc, "_logged", set())
    monkeypatch.setattr(ex, "grouped_mm", None)
    fused, grouped, loop = _experts("fused"), _experts("grouped_mm"), _experts("loop")
    with caplog.at_level(logging.DEBUG, logger="moelab.model.experts"):
        for _ in range(3):
            fused(*_inputs(8))          # fused -> loop: no grouped_mm
            grouped(*_inputs(8))        # grouped_mm -> loop: the same reason, another request
            loop(*_inputs(8))           # runs as asked: nothing to say
        with torch.no_grad():
            for n in (1, 2, 3):         # decode steps of several sizes: one key
                fused(*_inputs(n))
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "moelab.model.experts"]
    assert records == [
        ("INFO", "expert_impl 'fused' runs as 'loop': this torch has no grouped_mm"),
        ("INFO", "expert_impl 'grouped_mm' runs as 'loop': this torch has no grouped_mm"),
        ("DEBUG", "expert_impl 'fused' runs as 'few_tokens': decoding: fewer routed rows than experts, "
                  "no autograd"),
    ]


def test_substitution_is_logged_once_logging_is_on(monkeypatch, caplog):
    """A substitution seen while its level is off is still reported once that level is switched on."""
    monkeypatch.setattr(kc, "_logged", set())
    monkeypatch.setattr(ex, "grouped_mm", None)
    m = _experts("fused")
    with caplog.at_level(logging.WARNING, logger="moelab.model.experts"):
        m(*_inputs(8))
    assert not caplog.records
    with caplog.at_level(logging.INFO, logger="moelab.model.experts"):
        m(*_inputs(8))
        m(*_inputs(8))
    assert len(caplog.records) == 1 and "runs as 'loop'" in caplog.records[0].getMessage()


def test_grouped_mm_without_a_kernel_for_the_device_runs_the_loop(monkeypatch, caplog):
    """torch 2.8–2.10 have ``_grouped_mm`` for CUDA only: the op exists but raises on the CPU. The probe
    finds that once per device and dtype, the grouped requests run the loop (same result) and say why."""
    calls = []

    def no_cpu_kernel(*args, **kw):
        calls.append(1)
        raise NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(ex, "grouped_mm", no_cpu_kernel)
    monkeypatch.setattr(ex, "_probed", {})
    monkeypatch.setattr(kc, "_logged", set())
    why = ex.grouped_mm_missing(torch.device("cpu"), fp32)
    assert why.startswith("this torch's grouped_mm does not run on cpu in float32") and "'CPU' backend" in why
    assert ex.grouped_mm_missing(torch.device("cpu"), fp32) == why and calls == [1]       # probed once
    x, idx, gates = _inputs(8)
    ref = _experts("loop")
    for impl in ("fused", "grouped_mm"):
        m = _experts(impl)
        m.load_state_dict(ref.state_dict())
        with caplog.at_level(logging.INFO, logger="moelab.model.experts"):
            torch.testing.assert_close(m(x, idx, gates), ref(x, idx, gates), atol=1e-6, rtol=1e-6)
    assert calls == [1]
    assert any("runs as 'loop': this torch's grouped_mm does not run on cpu" in r.getMessage() for r in caplog.records)


def test_grouped_mm_probe_on_this_torch():
    """Here (torch with a CPU grouped_mm: 2.11+) the probe finds it; without the op it says so."""
    if ex.grouped_mm is None:
        assert ex.grouped_mm_missing(torch.device("cpu"), fp32) == NO_OP
    elif torch.__version__ >= (2, 11):
        assert ex.grouped_mm_missing(torch.device("cpu"), fp32) is None
        assert ex.grouped_mm_missing(torch.device("cpu"), bf16) is None
