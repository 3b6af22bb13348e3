"""Parameter activation, LLMDcos, layer-wise ratios and Wanda (moelab.analysis.activation / .pruning).

Oracles: the true effect of zeroing single weights (first-order A must rank them like |D(s,w) − D(s,0)|),
the closed-form ratio formula written out term by term, and brute-force per-row Wanda loops over inputs
captured by independent hooks (for nn.Linear and for moelab's stacked routed experts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import moelab
from moelab.analysis.activation import (
    activation_scope,
    counts_array,
    llmdcos,
    lm_logits,
    parameter_activation,
)
from moelab.analysis.analyze_cli import analyze_app
from moelab.analysis.pruning import (
    layerwise_sparsity,
    perplexity,
    restore,
    row_prune_mask,
    snapshot,
    wanda_prune,
    wanda_scores,
)
from moelab.config import make_config
from moelab.data.tokenizer import byte_level_tokenizer, save_tokenizer
from moelab.errors import ConfigError
from moelab.model.transformer import DeepSeekForCausalLM

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"
V = 97
MOE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=None,
           n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
           first_k_dense_replace=1, initializer_range=0.1, max_position_embeddings=64, expert_impl="loop")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def tiny_llama(dtype=torch.float64) -> LlamaForCausalLM:
    """A 2-layer d64 transformers Llama (GQA), random weights."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_moe(dtype=torch.float64) -> DeepSeekForCausalLM:
    """A 2-layer d64 moelab model: MLA, a dense layer 0, a DeepSeekMoE layer 1 (8 routed + 1 shared)."""
    return DeepSeekForCausalLM.from_config(make_config(MOE), seed=0, dtype=dtype).eval()


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def rank(x):
        x = np.asarray(x, dtype=np.float64)
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


# -- activation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_llama, tiny_moe], ids=["llama", "moelab-moe"])
def test_first_order_activation_ranks_weights_like_zeroing_them(make):
    model = make()
    ids = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(3))
    act = parameter_activation(model, [ids])
    scope = activation_scope(model)

    def top_logit():
        with torch.no_grad():
            return lm_logits(model, ids[None])[0, -1]

    base = top_logit()
    top = int(base.argmax())
    g = torch.Generator().manual_seed(1)
    first, true = [], []
    for _ in range(200):
        s = scope[int(torch.randint(len(scope), (1,), generator=g))]
        flat = s.param.data.view(-1)
        j = int(torch.randint(flat.numel(), (1,), generator=g))
        old = flat[j].item()
        flat[j] = 0.0                                                  # D(s, 0): this weight alone zeroed
        true.append(abs(float(base[top]) - float(top_logit()[top])))
        flat[j] = old
        first.append(float(act.mean(s.name).view(-1)[j]))
    assert spearman(first, true) > 0.9


def test_scope_covers_attention_mlp_and_stacked_experts_but_not_router_or_embeddings():
    names = {s.name: s.experts for s in activation_scope(tiny_moe())}
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and names["model.layers.1.mlp.experts.gate_up_proj"] == 8
    assert "model.layers.1.mlp.experts.down_proj" in names
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in names
    assert {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.self_attn.kv_b_proj.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight"} <= set(names)
    assert not any(".mlp.gate.weight" in n or "embed" in n or "lm_head" in n or "norm" in n for n in names)
    llama = {s.name.split("layers.0.")[-1] for s in activation_scope(tiny_llama()) if s.layer == 0}
    assert llama == ({f"self_attn.{p}_proj.weight" for p in "qkvo"}
                     | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")})
    small = {s.name.rsplit(".", 2)[-2] for s in activation_scope(tiny_llama(), max_dim=100)}
    assert small == {"q_proj", "k_proj", "v_proj", "o_proj"}                 # the [128, 64] MLP matrices drop out
    with pytest.raises(ConfigError, match="no weight matrices"):
        activation_scope(nn.Linear(3, 3))


def test_activation_restores_the_model_and_counts_are_consistent():
    model = tiny_moe(torch.float32)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    samples = [torch.randint(0, V, (10,)) for _ in range(5)]
    a = parameter_activation(model, samples)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert a.n == (3, 2) and a.n_samples == 5
    total = sum(p.numel() for p in (s.param for s in a.scope))
    assert sum(a.layer_sizes().values()) == total
    assert sum(a.counts(0.0).values()) <= total
    gamma = a.threshold(0.9, "quantile")
    share = sum(a.counts(gamma).values()) / total
    assert 0.09 <= share <= 0.11
    stacked = sum(int((a.mean(s.name) > gamma).sum()) for s in a.scope if s.experts)
    assert sum(sum(v) for v in a.expert_counts(gamma).values()) == stacked
    with pytest.raises(ConfigError, match="quantile"):
        a.threshold(2.0, "quantile")
    with pytest.raises(ConfigError, match="activation_threshold_mode"):
        a.threshold(2e-5, "relative")


def test_llmdcos_is_one_on_itself_symmetric_and_lower_across_domains():
    model = tiny_llama(torch.float32)
    gen = torch.Generator().manual_seed(0)
    low = [torch.randint(0, V // 2, (16,), generator=gen) for _ in range(6)]
    high = [torch.randint(V // 2, V, (16,), generator=gen) for _ in range(6)]
    a, b = parameter_activation(model, low, "low"), parameter_activation(model, high, "high")
    assert all(v == pytest.approx(1.0) for v in llmdcos(a, a).values())
    ab, ba = llmdcos(a, b), llmdcos(b, a)
    assert all(ab[i] == pytest.approx(ba[i]) for i in ab)
    assert all(0 < v < 1 for v in ab.values())
    within = llmdcos(a, a, 0, 1)
    assert all(0 < v < 1 for v in within.values())


# -- layer-wise ratios ------------------------------------------------------------------------------------

def test_layerwise_sparsity_formula_mean_and_monotonicity():
    N = np.array([120.0, 900, 870, 860, 700, 500, 300, 250])
    S, alpha, beta = 0.5, 2.0, 0.2
    got = layerwise_sparsity(N, S, alpha, beta)
    # the formula, term by term (i is 1-based; population std)
    mean, std, L = sum(N) / len(N), math.sqrt(sum((n - sum(N) / len(N)) ** 2 for n in N) / len(N)), len(N)
    n_prime = [1 / (1 + math.exp(-((n - mean) / std + alpha / i))) for i, n in enumerate(N, start=1)]
    want = [S + beta * S * (1 - p * L / sum(n_prime)) for p in n_prime]
    assert np.allclose(got, want, atol=1e-12)
    assert got.mean() == pytest.approx(S, abs=1e-12) and got.max() < S * (1 + beta)
    flat = layerwise_sparsity(N, S, alpha=0.0)
    order = np.argsort(N)
    assert np.all(np.diff(flat[order]) < 0)                          # more activated -> pruned less
    assert np.allclose(layerwise_sparsity([7, 7, 7], 0.4, alpha=0.0), 0.4)
    assert counts_array({2: 5, 0: 1, 1: 3}).tolist() == [1, 3, 5]
    with pytest.raises(ConfigError):
        layerwise_sparsity([1, 2], 1.0)


# -- Wanda --------------------------------------------------------------------------------------------------

def brute_force_rows(W: torch.Tensor, X: torch.Tensor, S: float) -> torch.Tensor:
    """Keep mask of Wanda on W [out, in] with inputs X [tokens, in]: per row, drop the lowest scores."""
    norms = [math.sqrt(sum(float(X[t, k]) ** 2 for t in range(X.shape[0]))) for k in range(W.shape[1])]
    keep = torch.ones_like(W, dtype=torch.bool)
    n_keep = round((1 - S) * W.shape[1])
    for j in range(W.shape[0]):
        scores = [abs(float(W[j, k])) * norms[k] for k in range(W.shape[1])]
        for k in sorted(range(W.shape[1]), key=lambda k: scores[k])[:W.shape[1] - n_keep]:
            keep[j, k] = False
    return keep


def test_wanda_on_a_linear_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(6, 10, generator=g), torch.randn(25, 10, generator=g)
    for S in (0.0, 0.3, 0.5, 0.75):
        keep = row_prune_mask(wanda_scores(W, X.pow(2).sum(0).sqrt()), S)
        assert torch.equal(keep, brute_force_rows(W, X, S))
        assert (keep.sum(1) == round((1 - S) * 10)).all()


def _captured_inputs(model, names):
    """Inputs of every nn.Linear and every routed expert's rows, captured by our own hooks on the dense model."""
    from moelab.model.moe import DeepSeekMoE

    xs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and f"{name}.weight" in names:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, name=name: xs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
        if isinstance(mod, DeepSeekMoE):
            def grab(m, a, name=name):
                x = a[0].reshape(-1, a[0].shape[-1])
                xs.setdefault(f"{name}.route", []).append((x, m.gate(x).indices))
            hooks.append(mod.register_forward_pre_hook(grab))
    return xs, hooks


@pytest.mark.parametrize("make", [tiny_llama, tiny_moe], ids=["llama", "moelab-moe"])
def test_wanda_prune_matches_brute_force_per_row(make):
    model = make(torch.float32)
    names = {s.name for s in activation_scope(model)}
    calib = [torch.randint(0, V, (8,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    xs, hooks = _captured_inputs(model, names)
    with torch.no_grad():
        for ids in calib:
            model(ids[None])
    for h in hooks:
        h.remove()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = wanda_prune(model, calib, 0.5, sequential=False)
    params = dict(model.named_parameters())
    checked = experts = 0
    for name in sorted(names):
        if name.endswith(".weight") and name[:-7] in xs:
            want = brute_force_rows(dense[name], torch.cat(xs[name[:-7]]).double(), 0.5)
            assert torch.equal(params[name] != 0, want), name
            checked += 1
    for key in [k for k in xs if k.endswith(".route")]:                  # routed experts, one by one
        mod = key[:-len(".route")]
        x = torch.cat([a for a, _ in xs[key]])
        idx = torch.cat([i for _, i in xs[key]])
        w_gu, w_dn = dense[f"{mod}.experts.gate_up_proj"], dense[f"{mod}.experts.down_proj"]
        inner = w_dn.shape[-1]
        for e in range(w_gu.shape[0]):
            xe = x[(idx == e).any(1)].double()
            gu = xe @ w_gu[e].double().T
            h = torch.nn.functional.silu(gu[:, :inner]) * gu[:, inner:]
            if len(xe):
                assert torch.equal(params[f"{mod}.experts.gate_up_proj"][e] != 0, brute_force_rows(w_gu[e], xe, 0.5))
                assert torch.equal(params[f"{mod}.experts.down_proj"][e] != 0, brute_force_rows(w_dn[e], h, 0.5))
                experts += 1
    assert checked >= 10 and (experts >= 4 if make is tiny_moe else experts == 0)
    assert rep["sparsity"] == 0.5 and rep["zeros"] == sum(int((params[n] == 0).sum()) for n in names)


def test_pruning_reaches_the_requested_sparsity_exactly_and_uniform_ratios_equal_plain_wanda():
    model = tiny_llama(torch.float32)
    calib = [torch.randint(0, V, (10,)) for _ in range(4)]
    saved = snapshot(model)
    ratios = {0: 0.375, 1: 0.625}
    rep = wanda_prune(model, calib, ratios)
    for s in activation_scope(model):
        kept = (s.param != 0).sum(-1)
        assert (kept == round((1 - ratios[s.layer]) * s.param.shape[-1])).all(), s.name
    assert rep["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert {i: v["sparsity"] for i, v in rep["layers"].items()} == ratios
    restore(model, saved)
    plain = wanda_prune(model, calib, 0.5)
    masks = {n: (p != 0) for n, p in model.named_parameters()}
    restore(model, saved)
    flat = layerwise_sparsity([5.0, 5.0], 0.5, alpha=0.0)             # constant N, α = 0 -> S_i = S
    wanda_prune(model, calib, dict(enumerate(flat.tolist())))
    assert all(torch.equal(masks[n], p != 0) for n, p in model.named_parameters())
    assert plain["sparsity"] == 0.5
    with pytest.raises(ConfigError, match="no sparsity given"):
        wanda_prune(model, calib, {0: 0.5})


def test_perplexity_is_exp_of_the_mean_cross_entropy():
    model = tiny_llama(torch.float32)
    samples = [torch.randint(0, V, (9,)) for _ in range(3)]
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(s[None]).logits[0, :-1], s[1:], reduction="sum")
               for s in samples]
    assert perplexity(model, samples, batch_size=2) == pytest.approx(math.exp(sum(map(float, nll)) / 24), rel=1e-5)


# -- CLI --------------------------------------------------------------------------------------------------

def test_cli_activation_end_to_end(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    save_tokenizer(byte_level_tokenizer(), tok_dir)
    cfg = {**MOE, "vocab_size": 272, "expert_impl": "fused", "max_position_embeddings": 128}
    moelab.save(DeepSeekForCausalLM.from_config(make_config(cfg), seed=0), tmp_path / "m", tokenizer=tok_dir)
    text = tmp_path / "t.txt"
    text.write_text(EXCERPT.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    sft = tmp_path / "a.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Calculate {i} + {i}.", "completion": str(2 * i)}) + "\n"
                           for i in range(20)), encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(analyze_app, [
        "activation", str(tmp_path / "m"), str(text), str(sft), "--out", str(out), "--samples", "4",
        "--seq-len", "32", "--activation-threshold", "0.8", "--activation-threshold-mode", "quantile",
        "--sparsity", "0.5", "--calib-samples", "2", "--eval-samples", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "activation.json").read_text())
    assert r["layers"] == [0, 1] and set(r["datasets"]) == {"t", "a"}
    assert r["threshold"]["mode"] == "quantile" and r["threshold"]["published"]["paper_32_layers"] == 2e-5
    assert set(r["llmdcos"]) == {"t vs a", "t within (half vs half)", "a within (half vs half)"}
    assert "1" in r["datasets"]["t"]["expert_counts"]
    ratios = r["pruning"]["ratios"]["0.5"]
    assert sum(ratios.values()) / 2 == pytest.approx(0.5)
    runs = {x["method"]: x for x in r["pruning"]["runs"]}
    assert runs["uniform"]["achieved"] == 0.5 and math.isfinite(runs["layer-wise"]["ppl"])
    for f in ("activation_counts.png", "llmdcos.png", "pruning.png"):
        assert (out / f).stat().st_size > 1000
    bad = CliRunner().invoke(analyze_app, ["activation", str(tmp_path / "m"), str(text), str(text), str(text),
                                           "--out", str(out)])
    assert bad.exit_code == 1 and "one or two datasets" in bad.output


@pytest.mark.slow
def test_smollm2_activation_and_wanda():
    from moelab.interop.hf_lm import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    ids = torch.tensor(tok("The quick brown fox jumps over the lazy dog. " * 3).input_ids[:24])
    a = parameter_activation(model, [ids, ids.flip(0)])
    assert a.layers == list(range(30)) and len(a.scope) == 30 * 7
    assert llmdcos(a, a)[29] == pytest.approx(1.0)
    rep = wanda_prune(model, [ids], 0.5)
    assert rep["sparsity"] == 0.5
