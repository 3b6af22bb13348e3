"""ESFT (docs/methods.md §5): selection against the released configurations, scores against a brute-force
per-token oracle, expert-only training, and the save / merge round trip (moelab and transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import moelab
from moelab.config import make_config
from moelab.errors import CheckpointError, ConfigError, DataError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.esft import (
    EXPERT_CONFIG,
    WEIGHTS,
    apply_esft,
    esft_state_dict,
    load_esft_into,
    merge_esft,
    read_expert_config,
    read_summary,
    remove_esft,
    save_esft,
    score_experts,
    select_experts,
    validate_expert_config,
    write_expert_config,
    write_summary,
)
from moelab.tune.esft_cli import esft_app

FIXTURES = Path(__file__).resolve().parents[1] / "assets" / "esft"
TASKS = {"intent": 4.77, "law": 5.88, "summary": 4.92, "translation": 3.19}   # mean experts per layer

# V2-Lite-like router (softmax, greedy top-k, no renormalisation, scale 1), one dense layer first.
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
            first_k_dense_replace=1, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
            norm_topk_prob=False, routed_scaling_factor=1.0, initializer_range=0.1, max_position_embeddings=64)
CFG = {"experts": {"1": [5, 0], "2": [3]}, "shared_experts": False, "non_expert_modules": False}


def tiny(seed: int = 0, **kw) -> DeepSeekForCausalLM:
    return DeepSeekForCausalLM.from_config(make_config(TINY | kw), seed=seed).eval()


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_released_summaries_reproduce_released_configs(task):
    released = fixture(f"{task}_expert_config.json")
    got = select_experts(fixture(f"{task}_summary.json"), "token", 0.2)
    assert len(got["experts"]) == 26
    for layer, ids in released["experts"].items():
        assert got["experts"][layer] == ids, f"{task} layer {layer}"
    assert got == released
    counts = [len(v) for v in got["experts"].values()]
    assert round(sum(counts) / len(counts), 2) == TASKS[task]


def test_fixtures_exercise_the_tie_rule():
    """Equal scores keep ascending expert id; the opposite order breaks released layers."""
    broken = 0
    for task in TASKS:
        summary, released = fixture(f"{task}_summary.json"), fixture(f"{task}_expert_config.json")
        for layer, row in summary["token_scores"].items():
            ranked = sorted(((int(e), s) for e, s in row.items()), key=lambda t: (t[1], t[0]), reverse=True)
            chosen, total = [], 0.0
            for e, s in ranked:
                if total >= 0.2:
                    break
                chosen.append(e)
                total += s
            broken += chosen != released["experts"][layer]
    assert broken > 0


def _one_layer(scores) -> dict:
    row = {str(i): s for i, s in enumerate(scores)}
    return {"token_scores": {"1": row}, "gate_scores": {"1": row}}


@pytest.mark.parametrize("scores, p, want", [
    ([0.15, 0.10, 0.05], 0.2, [0, 1]),           # docs/methods.md §5 check: 2 experts
    ([0.05, 0.30, 0.10], 0.2, [1]),              # one expert crosses p on its own
    ([0.10, 0.10, 0.05], 0.2, [0, 1]),           # reaching p exactly stops
    ([0.10, 0.20, 0.10, 0.10], 0.35, [1, 0, 2]), # ties: ascending id
    ([0.02, 0.03], 0.2, [1, 0]),                 # a layer below p trains everything
])
def test_selection_rule(scores, p, want):
    assert select_experts(_one_layer(scores), "token", p)["experts"] == {"1": want}
    assert select_experts(_one_layer(scores), "gate", p)["experts"] == {"1": want}


def test_select_switches_and_bad_arguments():
    cfg = select_experts(_one_layer([0.5, 0.5]), "gate", 0.1, train_shared_experts=True,
                         train_non_expert_modules=True)
    assert cfg == {"experts": {"1": [0]}, "shared_experts": True, "non_expert_modules": True}
    with pytest.raises(ConfigError, match="unknown score"):
        select_experts(_one_layer([1.0]), "tokens", 0.2)
    for p in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="p must be"):
            select_experts(_one_layer([1.0]), "token", p)


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------
def brute_force_scores(model, batches):
    """Per token and per sequence, with the router math redone by hand in float64 from the MoE input."""
    cfg = model.config
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    inputs = {}

    def grab(module, args):
        inputs.setdefault(module.layer_idx, []).append(args[0].detach().double())

    moes = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    handles = [m.register_forward_pre_hook(grab) for m in moes]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    gate, token = {}, {}
    for m in moes:
        W = m.gate.weight.detach().double()
        g_sum, r_sum, n = [0.0] * E, [0.0] * E, 0
        for x_BTH in inputs[m.layer_idx]:
            for x_TH in x_BTH:                                 # one sequence j
                g_seq, r_seq = [0.0] * E, [0.0] * E
                for x in x_TH:                                 # one token k
                    probs = torch.softmax(W @ x, dim=0).tolist()
                    for i in sorted(range(E), key=lambda i: -probs[i])[:K]:
                        g_seq[i] += probs[i]
                        r_seq[i] += 1 / K
                L = x_TH.shape[0]
                for i in range(E):
                    g_sum[i] += g_seq[i] / L
                    r_sum[i] += r_seq[i] / L
                n += 1
        gate[str(m.layer_idx)] = [v / n for v in g_sum]
        token[str(m.layer_idx)] = [v / n for v in r_sum]
    return token, gate


def test_scores_match_brute_force_per_sequence_means():
    model = tiny()
    batches = [torch.randint(0, 96, (2, 12)), torch.randint(0, 96, (1, 20))]    # L_j differ: 12, 12, 20
    got = score_experts(model, batches, progress=True)
    token, gate = brute_force_scores(model, batches)
    assert list(got["token_scores"]) == ["1", "2"] and list(got["gate_scores"]) == ["1", "2"]
    for layer in ("1", "2"):
        r = [got["token_scores"][layer][str(i)] for i in range(8)]
        g = [got["gate_scores"][layer][str(i)] for i in range(8)]
        assert r == pytest.approx(token[layer], abs=1e-12)
        assert g == pytest.approx(gate[layer], abs=1e-6)
        assert sum(r) == pytest.approx(1.0, abs=1e-12)
        assert 0 < sum(g) < 1                      # softmax mass of the top-2: a raw mean, not normalised
    assert got["meta"] == {"norm": "per_layer", "sequences": 3, "tokens": 44, "n_routed_experts": 8,
                                "top_k": 2}
    assert all(not m.routing_observers for m in (model.model.layers[1].mlp, model.model.layers[2].mlp))
    assert not model.training


def test_gate_scores_are_the_applied_weights_and_legacy_norm():
    # V3-style router: renormalised top-k times 2.5, so every token gives its experts 2.5 in total
    model = tiny(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True,
                 routed_scaling_factor=2.5).train()
    batches = [torch.randint(0, 96, (2, 10))]
    got = score_experts(model, batches)
    for layer in ("1", "2"):
        assert sum(got["gate_scores"][layer].values()) == pytest.approx(2.5, abs=1e-6)
    assert model.training                          # mode restored
    legacy = score_experts(model, batches, norm="legacy_across_layers")
    for kind in ("token_scores", "gate_scores"):
        for e in map(str, range(8)):
            col = [got[kind][layer][e] for layer in ("1", "2")]
            want = [v / sum(col) if sum(col) else 0.0 for v in col]
            assert [legacy[kind][layer][e] for layer in ("1", "2")] == pytest.approx(want, abs=1e-12)
    with pytest.raises(ConfigError, match="normalisation"):
        score_experts(model, batches, norm="global")


def test_summary_round_trip_and_malformed_files(tmp_path):
    summary = fixture("law_summary.json")
    write_summary(summary, tmp_path / "s.json")
    assert read_summary(tmp_path / "s.json") == summary
    bad = {"truncated.json": '{"token_scores": {"1": ', "no_gate.json": json.dumps({"token_scores": {"1": {"0": 1}}}),
           "negative.json": json.dumps({"token_scores": {"1": {"0": -1}}, "gate_scores": {"1": {"0": 1}}}),
           "key.json": json.dumps({"token_scores": {"one": {"0": 1}}, "gate_scores": {"1": {"0": 1}}}),
           "list.json": "[1, 2]"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError):
            read_summary(tmp_path / name)
    with pytest.raises(DataError, match="not found"):
        read_summary(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------
# training only the selected experts
# ----------------------------------------------------------------------------------------------
def train_steps(model, steps: int = 3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 96, (2, 16))
        loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("impl", ["fused", "loop"])
def test_only_selected_experts_train(impl):
    model = tiny(expert_impl=impl).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    info = apply_esft(model, CFG)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)         # applying ESFT changes nothing by itself
    H, I = 32, 16
    assert info.n_trainable == 3 * (2 * I * H + H * I)
    assert info.experts_per_layer == {1: 2, 2: 1} and "3 of 16 routed experts" in info.summary

    loads = torch.zeros(3, 8, dtype=torch.long)

    def count(moe, routing):
        loads[moe.layer_idx] += torch.bincount(routing.indices.flatten(), minlength=8)

    for layer in (1, 2):
        model.model.layers[layer].mlp.routing_observers.append(count)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randint(0, 96, (2, 16))
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is None) == (not p.requires_grad), name
        opt.step()
    # optimizer state covers exactly the selected experts' elements
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == 3 * (2 * I * H + H * I)
    # routing stays free: unselected experts still receive tokens
    assert loads[1, [1, 2, 3, 4, 6, 7]].sum() > 0 and loads[2, [0, 1, 2, 4, 5, 6, 7]].sum() > 0

    remove_esft(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(p.requires_grad for p in model.parameters())
    selected = {1: [5, 0], 2: [3]}
    for name, t in before.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = int(name.split(".")[2])
            for e in range(8):
                same = torch.equal(after[name][e], t[e])
                assert same == (e not in selected[layer]), (name, e)
        else:
            assert torch.equal(after[name], t), name         # router, attention, shared experts, embeddings ...


def test_switches_make_shared_and_non_expert_modules_trainable():
    model = tiny()
    info = apply_esft(model, CFG | {"shared_experts": True, "non_expert_modules": True})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
                 "model.norm.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                 "model.layers.1.mlp.experts.parametrizations.gate_up_proj.0.rows"):
        assert name in trainable, name
    assert "model.layers.1.mlp.experts.parametrizations.gate_up_proj.original" not in trainable
    stacked = sum(p.numel() for n, p in model.named_parameters() if "original" in n)
    assert info.n_trainable == info.n_total - stacked + 3 * (3 * 16 * 32)
    with pytest.raises(ConfigError, match="already applied"):
        apply_esft(model, CFG)


# ----------------------------------------------------------------------------------------------
# save, load, merge
# ----------------------------------------------------------------------------------------------
def expected_keys(cfg: dict) -> set[str]:
    return {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer, ids in cfg["experts"].items()
            for e in ids for proj in ("gate_proj", "up_proj", "down_proj")}


@pytest.fixture
def trained(tmp_path):
    """(base checkpoint dir, ESFT dir, the trained model with ESFT folded back)."""
    model = tiny()
    moelab.save(model, tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    apply_esft(model, CFG)
    train_steps(model)
    sd = esft_state_dict(model)
    assert set(sd) == expected_keys(CFG)
    save_esft(model, None, tmp_path / "esft")
    remove_esft(model)
    for key, t in sd.items():                          # split gate/up rows = the folded stacked tensors
        layer, e, proj = int(key.split(".")[2]), int(key.split(".")[5]), key.split(".")[6]
        ex = model.model.layers[layer].mlp.experts
        full = {"gate_proj": ex.gate_up_proj[e, :16], "up_proj": ex.gate_up_proj[e, 16:],
                "down_proj": ex.down_proj[e]}[proj]
        assert torch.equal(t, full), key
    return tmp_path / "base", tmp_path / "esft", model.eval()


def test_save_holds_exactly_the_selected_experts(trained):
    from moelab.interop.checkpoint import iter_tensors, weight_files

    _, esft, _ = trained
    assert sorted(p.name for p in esft.iterdir()) == [EXPERT_CONFIG, WEIGHTS]
    assert {k for k, _, _ in iter_tensors(weight_files(esft))} == expected_keys(CFG)
    assert read_expert_config(esft / EXPERT_CONFIG) == CFG


def test_merge_equals_trained_model(trained, tmp_path):
    base, esft, model = trained
    out = merge_esft(base, esft, tmp_path / "merged")
    assert (out / "tokenizer.json").is_file()
    merged = moelab.load(out)
    for name, t in model.state_dict().items():
        assert torch.equal(merged.state_dict()[name], t), name
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, model(ids).logits)
    in_memory = moelab.load(base)
    assert load_esft_into(in_memory, esft) == CFG
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, model(ids).logits)
    with pytest.raises(CheckpointError, match="new directory"):
        merge_esft(base, esft, base)


def test_merged_checkpoint_opens_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, esft, model = trained
    out = merge_esft(base, esft, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_esft_files_load_strictly(trained, tmp_path):
    base, esft, _ = trained
    good = load_file(esft / WEIGHTS)

    def variant(name: str, tensors: dict, cfg=CFG) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file({k: v.clone() for k, v in tensors.items()}, str(d / WEIGHTS))
        (d / EXPERT_CONFIG).write_text(json.dumps(cfg))
        return d

    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    cases = {
        "extra": (good | {"model.layers.1.mlp.experts.1.up_proj.weight": good[key]}, "does not select"),
        "unknown": (good | {"model.layers.9.mlp.experts.1.up_proj.weight": good[key]}, "does not exist"),
        "shape": (good | {key: good[key][:, :8].contiguous()}, "shape"),
        "missing": ({k: v for k, v in good.items() if k != key}, "missing"),
        "module": (good | {"model.norm.weight": torch.ones(32)}, "non_expert_modules false"),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_esft_into(moelab.load(base), variant(name, tensors))
    with pytest.raises(CheckpointError, match="does not exist"):
        merge_esft(base, variant("other", good | {"model.layers.1.mlp.experts.9.up_proj.weight": good[key]}),
                   tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_model_without_routed_experts_is_refused():
    for kw in (dict(n_routed_experts=0), dict(first_k_dense_replace=3)):
        model = tiny(**kw)
        with pytest.raises(ConfigError, match="ESFT needs routed experts"):
            score_experts(model, [torch.zeros(1, 4, dtype=torch.long)])
        with pytest.raises(ConfigError, match="ESFT needs routed experts"):
            apply_esft(model, CFG)


@pytest.mark.parametrize("experts, message", [
    ({"0": [1]}, "layer 0 is a dense layer"),
    ({"3": [1]}, "layer 3 does not exist"),
    ({"1": [8]}, "lists expert 8, but the model has 8"),
    ({"1": [2, 2]}, "twice"),
    ({"1": [-1]}, "start at 0"),
    ({"1": ["2"]}, "integer expert ids"),
    ({"x": [1]}, "not a non-negative integer"),
])
def test_bad_expert_configs(experts, message, tmp_path):
    model = tiny()
    cfg = {"experts": experts, "shared_experts": False, "non_expert_modules": False}
    with pytest.raises(ConfigError, match=message):
        validate_expert_config(cfg, model)
    with pytest.raises(ConfigError, match=message):
        apply_esft(model, cfg)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        read_expert_config(tmp_path / "cfg.json", model)
    assert all(p.requires_grad for p in model.parameters())        # a refused config changes nothing


def test_expert_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'expert'"):
        validate_expert_config({"expert": {}})
    with pytest.raises(ConfigError, match="true or false"):
        validate_expert_config({"experts": {}, "shared_experts": "yes"})
    with pytest.raises(ConfigError, match="no shared experts"):
        validate_expert_config(CFG | {"shared_experts": True}, tiny(n_shared_experts=0))
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_expert_config(tmp_path / "bad.json")
    write_expert_config(CFG, tmp_path / "ok.json", tiny())
    assert read_expert_config(tmp_path / "ok.json") == CFG
    with pytest.raises(ConfigError, match="nothing would train"):
        apply_esft(tiny(), {"experts": {"1": []}})


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def test_cli_select_writes_the_released_config(tmp_path):
    out = tmp_path / "cfg" / "expert_cfg.json"
    r = CliRunner().invoke(esft_app, ["select", str(FIXTURES / "intent_summary.json"), "--score", "token",
                                      "--p", "0.2", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads(out.read_text()) == fixture("intent_expert_config.json")
    assert "mean 4.77 experts per layer" in r.stdout


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"token_scores": {}}')
    r = CliRunner().invoke(esft_app, ["select", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0, r.stderr
    assert "token_scores" in r.stderr and not (tmp_path / "o.json").exists()
    r = CliRunner().invoke(esft_app, ["merge", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "not found" in r.stderr, r.stderr


def test_cli_score_on_token_directory(tmp_path):
    from moelab.data.tokens import prepare

    text = tmp_path / "corpus.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i} says hello to expert {i % 7}"}) + "\n"
                            for i in range(60)))
    prepare([text], tmp_path / "tok", vocab_size=300, min_frequency=1, val_docs=2, progress=False)
    moelab.save(tiny(vocab_size=300), tmp_path / "ckpt")
    out = tmp_path / "summary.json"
    r = CliRunner().invoke(esft_app, ["score", str(tmp_path / "ckpt"), str(tmp_path / "tok"), "--out", str(out),
                                      "--samples", "3", "--seq-len", "16", "--batch-size", "2", "--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    summary = read_summary(out)
    assert summary["meta"]["sequences"] == 3 and summary["meta"]["tokens"] == 48
    assert sum(summary["token_scores"]["1"].values()) == pytest.approx(1.0, abs=1e-9)


def test_cli_score_on_jsonl_batches_packed_sequences(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def pack_file(path, tokenizer_path, seq_len, n_sequences=None):
        calls.append((Path(path).name, Path(tokenizer_path).name, seq_len, n_sequences))
        yield from (torch.randint(0, 96, (n,)) for n in (8, 8, 8, 5))     # the last one is shorter

    moelab.save(tiny(), tmp_path / "ckpt")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    monkeypatch.setitem(sys.modules, "moelab.data.sft", types.SimpleNamespace(pack_file=pack_file))
    out = tmp_path / "summary.json"
    args = ["score", str(tmp_path / "ckpt"), str(tmp_path / "sft.jsonl"), "--out", str(out), "--samples", "4",
            "--seq-len", "8", "--batch-size", "2"]
    r = CliRunner().invoke(esft_app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    assert calls == [("sft.jsonl", "ckpt", 8, 4)]
    assert read_summary(out)["meta"]["sequences"] == 4 and read_summary(out)["meta"]["tokens"] == 29
    assert "experts for p=0.2" in r.stdout

    monkeypatch.setitem(sys.modules, "moelab.data.sft", None)          # an install without the SFT reader
    r = CliRunner().invoke(esft_app, args)
    assert r.exit_code == 1 and "moelab.data.sft" in r.stderr, r.stderr
