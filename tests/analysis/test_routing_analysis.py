"""Routing analysis (moelab.analysis.routing, `moelab analyze routing`).

Oracles: closed-form values of the metrics (uniform / one-hot / disjoint distributions), an independent
recount of the routing decisions (the router applied by hand to the MoE inputs captured with forward
hooks), and a dataset compared with itself (Jaccard 1, cosine 1, JS 0).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moelab
from moelab.analysis.analyze_cli import analyze_app
from moelab.analysis.routing import (
    RoutingStats,
    collect_routing,
    cover_set,
    js_divergence,
    layer_metrics,
    normalized_entropy,
    overlap,
    routed_layers,
    routing_report,
)
from moelab.config import make_config
from moelab.data.samples import data_kind, load_samples, unique_names
from moelab.data.tokenizer import byte_level_tokenizer, save_tokenizer
from moelab.data.tokens import prepare
from moelab.errors import ConfigError, DataError
from moelab.interop.hf_lm import load_causal_lm
from moelab.model.transformer import DeepSeekForCausalLM

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"
MOE = dict(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
           n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
           first_k_dense_replace=1, initializer_range=0.2, max_position_embeddings=256)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    save_tokenizer(byte_level_tokenizer(), tok_dir)
    model_dir = root / "model"
    moelab.save(DeepSeekForCausalLM.from_config(make_config(MOE), seed=0), model_dir, tokenizer=tok_dir)
    text = EXCERPT.read_text(encoding="utf-8")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(text[i * 2000:(i + 1) * 2000], encoding="utf-8")
    tokens = root / "tokens"
    prepare([corpus], tokens, tokenizer=tok_dir, val_docs=2, progress=False)
    sft = root / "arith.jsonl"
    rng = np.random.default_rng(0)
    rows = [(int(a), int(b)) for a, b in rng.integers(0, 50, size=(60, 2))]
    sft.write_text("".join(json.dumps({"prompt": f"Calculate {a} + {b}.", "completion": str(a + b)}) + "\n"
                           for a, b in rows), encoding="utf-8")
    return {"root": root, "model": model_dir, "tokens": tokens, "sft": sft, "corpus": corpus, "tok": tok_dir}


# -- metrics against closed forms ------------------------------------------------------------------------

def test_metrics_closed_forms():
    E = 8
    uniform, onehot = np.full(E, 1 / E), np.eye(E)[3]
    assert normalized_entropy(uniform) == pytest.approx(1.0)
    assert normalized_entropy(onehot) == 0.0
    assert js_divergence(uniform, uniform) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(np.eye(E)[0], np.eye(E)[1]) == pytest.approx(1.0)   # disjoint support: 1 bit
    m = layer_metrics(uniform, top_k=2, coverage=0.5)
    assert m["top_n"] == pytest.approx({"1": 1 / 8, "2": 2 / 8, "4": 4 / 8})
    assert m["cover_size"] == 4 and m["max_vio"] == pytest.approx(0.0)
    assert layer_metrics(onehot, top_k=2)["max_vio"] == pytest.approx(E - 1)
    # the expert that crosses the coverage is included; ties keep ascending ids
    assert cover_set(np.array([0.1, 0.4, 0.3, 0.2]), 0.5) == [1, 2]
    assert cover_set(np.array([0.25, 0.25, 0.25, 0.25]), 0.5) == [0, 1]
    o = overlap(np.array([0.5, 0.5, 0, 0]), np.array([0, 0.5, 0.5, 0]), 0.9)
    assert o["jaccard"] == pytest.approx(1 / 3)
    assert o["cosine"] == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        cover_set(uniform, 0.0)


def test_report_of_a_dataset_with_itself_is_full_overlap():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(2, 6))
    s = RoutingStats("a", [1, 2], counts, counts.astype(float), tokens=int(counts.sum() // 2), sequences=3, top_k=2)
    t = RoutingStats("b", [1, 2], counts[:, ::-1].copy(), counts.astype(float), 10, 1, 2)
    r = routing_report([s, s, t])
    assert r["overlap_matrix"]["jaccard"][0][1] == pytest.approx(1.0)
    assert r["overlap_matrix"]["cosine"][0][1] == pytest.approx(1.0)
    assert r["overlap_matrix"]["js"][0][1] == pytest.approx(0.0, abs=1e-12)
    assert r["overlap_matrix"]["js"][0][2] > 0
    for layer in ("1", "2"):
        assert sum(r["datasets"]["a"]["layers"][layer]["load"]) == pytest.approx(1.0)
        assert sum(r["datasets"]["a"]["layers"][layer]["gate_share"]) == pytest.approx(1.0)
    assert set(r["overlap"]) == {"a|a", "a|b"}


# -- counting routing decisions ---------------------------------------------------------------------------

def test_collect_routing_matches_an_independent_recount():
    model = DeepSeekForCausalLM.from_config(make_config(MOE), seed=1).eval()
    samples = [torch.randint(0, 272, (12,)) for _ in range(3)] + [torch.randint(0, 272, (7,))]
    stats = collect_routing(model, samples, "x", batch_size=2)
    # oracle: the router applied by hand to each MoE block's captured input
    expected = {i: torch.zeros(MOE["n_routed_experts"], dtype=torch.long) for i in routed_layers(model)}
    hooks = []
    for i, moe in routed_layers(model).items():
        def grab(mod, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1])
            expected[i] += torch.bincount(mod.gate(x).indices.reshape(-1), minlength=MOE["n_routed_experts"])
        hooks.append(moe.register_forward_pre_hook(grab))
    with torch.no_grad():
        for s in samples:
            model(s[None])
    for h in hooks:
        h.remove()
    assert stats.layers == [1, 2]
    assert np.array_equal(stats.counts, np.stack([expected[i].numpy() for i in (1, 2)]))
    assert stats.tokens == 12 * 3 + 7 and stats.sequences == 4
    assert stats.counts.sum(1).tolist() == [stats.tokens * 2] * 2
    assert np.allclose(stats.load.sum(1), 1.0)
    assert all(not m.routing_observers for m in routed_layers(model).values())   # observers removed


def test_models_without_routed_experts_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = DeepSeekForCausalLM.from_config(make_config({**MOE, "n_routed_experts": None}), seed=0)
    with pytest.raises(ConfigError, match="routing analysis needs routed experts"):
        collect_routing(dense, [torch.zeros(4, dtype=torch.long)])
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ConfigError, match="routing analysis needs routed experts"):
        routed_layers(llama)


# -- datasets --------------------------------------------------------------------------------------------

def test_load_samples_from_every_kind_of_dataset(setup):
    _, tok = load_causal_lm(setup["model"])
    assert data_kind(setup["tokens"]) == "tokens" and data_kind(setup["sft"]) == "sft"
    assert data_kind(setup["corpus"]) == "text"
    w = load_samples(setup["tokens"], tok, 5, 32, split="train")
    assert len(w) == 5 and all(s.shape == (32,) and s.dtype == torch.long for s in w)
    packed = load_samples(setup["sft"], tok, 4, 64)
    assert 1 <= len(packed) <= 4 and all(2 <= len(s) <= 64 for s in packed)
    assert packed[0][0] == 0                                          # BOS of the DeepSeek template
    prompts = load_samples(setup["sft"], tok, 3, 200, shots=2, seed=1)
    text = tok.decode(prompts[0].tolist())
    assert len(prompts) == 3 and text.count("<｜User｜>") == 3 and text.endswith("<｜Assistant｜>")
    docs = load_samples(setup["corpus"], tok, 4, 50)
    assert len(docs) == 4 and all(len(s) == 50 for s in docs)
    assert len({tuple(s.tolist()) for s in docs}) == 4
    one_file = load_samples(setup["corpus"] / "d0.txt", tok, 5, 100)          # one document, several windows
    assert len(one_file) == 5 and len({tuple(s.tolist()) for s in one_file}) == 5
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        load_samples(setup["corpus"], tok, 2, 50, vocab_size=100)
    with pytest.raises(DataError, match="no 'test' split"):
        load_samples(setup["tokens"], tok, 2, 16, split="test")
    assert unique_names(["a/x.jsonl", "b/x.jsonl", "shakespeare"]) == ["x", "x#2", "shakespeare"]


def test_cli_routing_writes_json_and_plots(setup, tmp_path):
    out = tmp_path / "r"
    res = CliRunner().invoke(analyze_app, ["routing", str(setup["model"]), str(setup["tokens"]), str(setup["sft"]),
                                           str(setup["tokens"]), "--out", str(out), "--samples", "6",
                                           "--seq-len", "48", "--split", "train", "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "routing.json").read_text())
    assert r["names"] == ["tokens", "arith", "tokens#2"]
    assert r["layers"] == [1, 2] and r["n_routed_experts"] == 8 and r["top_k"] == 2
    for d in r["datasets"].values():
        for layer in d["layers"].values():
            assert math.isclose(sum(layer["load"]), 1.0, rel_tol=1e-9)
            assert 0 <= layer["entropy"] <= 1 and len(layer["cover_set"]) == layer["cover_size"]
    same = r["overlap"]["tokens|tokens#2"]["mean"]
    assert same["jaccard"] == 1 and same["cosine"] == pytest.approx(1) and same["js"] == pytest.approx(0, abs=1e-12)
    assert (out / "routing_load.png").stat().st_size > 1000 and (out / "routing_overlap.png").stat().st_size > 1000


def test_cli_routing_on_a_dense_model_is_a_clear_error(setup, tmp_path):
    dense = tmp_path / "dense"
    with warnings.catch_warnings():     # the save notes how transformers would read this (unused) router setup
        warnings.simplefilter("ignore")
        moelab.save(DeepSeekForCausalLM.from_config(make_config({**MOE, "n_routed_experts": None}), seed=0), dense,
                    tokenizer=setup["tok"])
    res = CliRunner().invoke(analyze_app, ["routing", str(dense), str(setup["tokens"]), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "routing analysis needs routed experts" in res.output
    assert "Traceback" not in res.output
