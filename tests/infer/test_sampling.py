"""Next-token selection (moelab.infer.sampling) against brute-force Python references."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.infer.sampling import SamplingConfig, filter_logits, sample_next


# ----------------------------------------------------------------------------------------------
# brute-force references (plain Python floats, one row at a time)
# ----------------------------------------------------------------------------------------------
def _softmax(xs: list[float]) -> list[float]:
    m = max(x for x in xs if x != -math.inf)
    e = [0.0 if x == -math.inf else math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _keep_top_k(row: list[float], k: int) -> set[int]:
    if k <= 0 or k >= len(row):
        return {i for i, x in enumerate(row) if x != -math.inf}
    kth = sorted(row, reverse=True)[k - 1]
    return {i for i, x in enumerate(row) if x >= kth}


def _keep_top_p(row: list[float], p: float) -> set[int]:
    """The smallest prefix of tokens sorted by probability whose mass reaches p (at least one)."""
    probs = _softmax(row)
    order = sorted(range(len(row)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if probs[i] == 0.0:
            break
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


def _near_boundary(row: list[float], p: float, eps: float = 1e-9) -> bool:
    """True when some prefix mass lies within eps of p (float rounding could decide the cut)."""
    probs = sorted(_softmax(row), reverse=True)
    mass = 0.0
    for q in probs:
        mass += q
        if abs(mass - p) < eps:
            return True
    return False


def _kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in filtered]


# ----------------------------------------------------------------------------------------------
# filter_logits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 17, 49])
def test_top_k_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(16, 50, generator=g) * 3
    out = filter_logits(logits, top_k=k)
    assert out.shape == logits.shape
    for row, kept in zip(logits.tolist(), _kept(out), strict=True):
        assert kept == _keep_top_k(row, k)
        assert len(kept) == k  # random continuous logits: no ties
    # kept logits are unchanged
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


@pytest.mark.parametrize("k", [0, 50, 80])
def test_top_k_off_or_at_least_vocab_is_a_no_op(k):
    logits = torch.randn(4, 50)
    assert torch.equal(filter_logits(logits, top_k=k), logits)


@pytest.mark.parametrize("p", [1e-6, 0.05, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999999])
@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_top_p_matches_brute_force(p, scale):
    g = torch.Generator().manual_seed(int(p * 1e6) + int(scale * 10))
    logits = torch.randn(32, 40, generator=g, dtype=torch.float64) * scale
    out = filter_logits(logits, top_p=p)
    checked = 0
    for row, kept in zip(logits.tolist(), _kept(out), strict=True):
        assert len(kept) >= 1  # always at least one token
        if _near_boundary(row, p):
            continue
        assert kept == _keep_top_p(row, p), (p, scale)
        checked += 1
    assert checked >= 28
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_top_p_tiny_keeps_exactly_the_argmax():
    logits = torch.randn(64, 100)
    kept = _kept(filter_logits(logits, top_p=1e-9))
    assert kept == [{int(i)} for i in logits.argmax(-1)]


def test_top_p_one_is_a_no_op():
    logits = torch.randn(8, 30)
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)


@pytest.mark.parametrize("k,p", [(5, 0.5), (10, 0.9), (3, 0.99), (20, 0.3)])
def test_top_k_then_top_p_matches_brute_force(k, p):
    """top-k first, then the nucleus of the renormalised top-k distribution."""
    g = torch.Generator().manual_seed(k * 100 + int(p * 100))
    logits = torch.randn(32, 40, generator=g, dtype=torch.float64) * 2
    out = filter_logits(logits, top_k=k, top_p=p)
    for row, kept in zip(logits.tolist(), _kept(out), strict=True):
        ks = _keep_top_k(row, k)
        masked = [x if i in ks else -math.inf for i, x in enumerate(row)]
        if _near_boundary(masked, p):
            continue
        assert kept == _keep_top_p(masked, p)


# ----------------------------------------------------------------------------------------------
# SamplingConfig
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_sampling_config_rejects_bad_values(kwargs, field):
    with pytest.raises(MoelabError, match=field):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_edge_values():
    SamplingConfig(temperature=0.0)
    SamplingConfig(top_p=1.0, top_k=0)
    SamplingConfig(top_p=1e-9, top_k=1, temperature=5.0)


def test_temperature_zero_is_greedy():
    cfg = SamplingConfig(temperature=0.0)
    assert cfg.greedy
    logits = torch.randn(32, 100)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        assert torch.equal(sample_next(logits, cfg, g), logits.argmax(-1))


def test_greedy_ignores_filters_and_dtype():
    logits = torch.randn(16, 64).to(torch.bfloat16)
    cfg = SamplingConfig(greedy=True, top_k=3, top_p=0.2, temperature=3.0)
    out = sample_next(logits, cfg)
    assert out.dtype == torch.int64 and out.shape == (16,)
    assert torch.equal(out, logits.float().argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(64, 50)
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample_next(logits, cfg, g) for _ in range(5)])

    a, b = draw(123), draw(123)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(124))


def test_top_k_one_sampling_equals_greedy():
    logits = torch.randn(32, 80)
    g = torch.Generator().manual_seed(0)
    out = sample_next(logits, SamplingConfig(top_k=1, temperature=1.7), g)
    assert torch.equal(out, logits.argmax(-1))


def test_sampled_tokens_stay_inside_top_k():
    logits = torch.randn(1, 30).expand(4000, 30)
    g = torch.Generator().manual_seed(1)
    out = sample_next(logits, SamplingConfig(top_k=3), g)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(out.tolist()) == allowed


def test_top_p_frequencies_match_renormalised_nucleus():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.15])
    # mass before each token: 0, 0.4, 0.65, 0.85 -> top_p 0.7 keeps the first three
    n = 20000
    logits = probs.log().expand(n, 4)
    g = torch.Generator().manual_seed(2024)
    out = sample_next(logits, SamplingConfig(top_p=0.7), g)
    freq = torch.bincount(out, minlength=4).double() / n
    expected = torch.tensor([0.4, 0.25, 0.2, 0.0], dtype=torch.float64) / 0.85
    assert freq[3] == 0.0
    assert torch.allclose(freq, expected, atol=0.02), (freq, expected)


def test_temperature_frequencies_match_tempered_softmax():
    logits0 = torch.tensor([1.0, 0.0, -1.0])
    n = 20000
    g = torch.Generator().manual_seed(7)
    out = sample_next(logits0.expand(n, 3), SamplingConfig(temperature=2.0), g)
    freq = torch.bincount(out, minlength=3).double() / n
    expected = (logits0.double() / 2.0).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.02), (freq, expected)
