"""LoRA on moelab models against PEFT + transformers (the oracle), on tiny random configs (fp32, CPU).

Base weights go out with ``moelab.save`` and open in ``AutoModelForCausalLM``; moelab's adapter opens
with ``peft.PeftModel.from_pretrained`` (and PEFT's adapter with ``load_adapter``); logits, merged
weights and targeted names must agree.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import moelab
from moelab.errors import CheckpointError, ConfigError
from moelab.interop.hf_config import config_from_hf
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.lora import (
    DEFAULT_TARGETS,
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    has_lora,
    load_adapter,
    lora_parameters,
    make_lora_settings,
    merge_lora,
    save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_oracle import hf_model, v2_config, v3_config  # noqa: E402  (tests/support)

ATOL = 1e-5
ATTN = r".*\.self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"


def tiny(kind: str = "v3", seed: int = 3) -> DeepSeekForCausalLM:
    """A random moelab model of the parity configs: 3 layers (layer 0 dense), 16 routed experts, shared
    experts; v3 with q_lora and sigmoid/noaux_tc routing, v2 with q_proj and softmax greedy routing."""
    hf_cfg = v3_config() if kind == "v3" else v2_config()
    model = DeepSeekForCausalLM.from_config(config_from_hf(hf_cfg.to_dict()), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero routing bias, as in test_hf_parity
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.3, generator=gen)
    return model.eval()


def randomize(model, std: float = 0.1) -> None:
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, std)


def train_steps(model, n: int = 3, lr: float = 2e-2) -> None:
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr)
    model.train()
    for _ in range(n):
        ids = torch.randint(0, 160, (2, 16))
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def peft_model(base_dir, adapter_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


# ----------------------------------------------------------------------------------------------
# parity with PEFT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,how,settings", [
    ("v3", "random", LoraSettings(r=4, alpha=8)),
    ("v3", "trained", LoraSettings(r=2, alpha=16)),
    ("v2", "random", LoraSettings(r=2, alpha=3.0, use_rslora=True)),
])
def test_adapter_opens_in_peft_with_same_logits_and_merge(kind, how, settings, tmp_path):
    ours = tiny(kind)
    moelab.save(ours, tmp_path / "base")
    ids = torch.randint(0, 160, (2, 24))
    with torch.no_grad():
        before = ours(ids).logits
    info = apply_lora(ours, settings)
    assert any(".mlp.experts." in n for n in info.adapted) and any(".shared_experts." in n for n in info.adapted)
    if how == "random":
        randomize(ours)
    else:
        train_steps(ours)
    with torch.no_grad():
        got = ours(ids).logits
    assert (got - before).abs().max() > (1e-2 if how == "trained" else 0.5)   # the adapter matters
    save_adapter(ours, tmp_path / "adapter", str(tmp_path / "base"), settings)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == settings.r and cfg["use_rslora"] == settings.use_rslora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft_model(tmp_path / "base", tmp_path / "adapter")
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    theirs, mine = peft.get_peft_model_state_dict(pm), adapter_state_dict(ours)
    assert sorted(theirs) == sorted(mine)                     # PEFT built exactly our adapters ...
    for k in mine:
        assert torch.equal(theirs[k], mine[k]), k             # ... and read every tensor into them
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, got, atol=ATOL, rtol=0)

    merged_hf = pm.merge_and_unload()
    merge_lora(ours)
    assert not has_lora(ours)
    ref = merged_hf.state_dict()
    for name, t in ours.state_dict().items():                  # fused experts share names in memory
        torch.testing.assert_close(t, ref[name], atol=1e-6, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, got, atol=ATOL, rtol=0)


def test_single_expert_parameter_and_list_targets_open_in_peft(tmp_path):
    """One adapted expert parameter per layer is PEFT's un-nested wrapper (``mlp.experts.lora_A``)."""
    ours = tiny("v3")
    moelab.save(ours, tmp_path / "base")
    settings = LoraSettings(r=3, alpha=6, target_modules=["down_proj", "kv_b_proj"])
    info = apply_lora(ours, settings)
    assert "model.layers.1.mlp.experts.down_proj" in info.adapted
    assert ("model.layers.0.mlp.down_proj" in info.adapted
            and "model.layers.1.mlp.shared_experts.down_proj" in info.adapted)
    assert not any(n.endswith("gate_up_proj") for n in info.adapted)
    randomize(ours)
    keys = adapter_state_dict(ours)
    assert "base_model.model.model.layers.1.mlp.experts.lora_A.weight" in keys
    assert not any("base_layer" in k for k in keys)
    save_adapter(ours, tmp_path / "adapter", "base", settings)
    ids = torch.randint(0, 160, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tmp_path / "base", tmp_path / "adapter")(ids).logits,
                                   ours(ids).logits, atol=ATOL, rtol=0)


def test_peft_written_adapter_loads_into_moelab(tmp_path):
    hf = hf_model(v3_config())
    hf.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_a_proj", "kv_b_proj", "o_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")   # random B: a non-trivial adapter
    ids = torch.randint(0, 160, (2, 16))
    with torch.no_grad():
        base = hf(ids).logits
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    ours = moelab.load(tmp_path / "base")
    info = load_adapter(ours, tmp_path / "adapter")
    assert ("model.layers.2.mlp.experts.gate_up_proj" in info.adapted
            and "model.layers.0.self_attn.o_proj" in info.adapted)
    with torch.no_grad():
        ref = pm(ids).logits
        assert (ref - base).abs().max() > 0.1
        torch.testing.assert_close(ours(ids).logits, ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------
def expected_default_targets(model) -> set[str]:
    """The default targets, listed by hand from the module tree."""
    out = set()
    for i, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            if hasattr(layer.self_attn, proj):
                out.add(f"model.layers.{i}.self_attn.{proj}")
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            out |= {f"model.layers.{i}.mlp.experts.gate_up_proj", f"model.layers.{i}.mlp.experts.down_proj"}
            out |= {f"model.layers.{i}.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        else:
            out |= {f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    return out


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_default_targets_hit_attention_dense_shared_and_routed_never_the_router(kind):
    model = tiny(kind)
    info = apply_lora(model, LoraSettings())
    assert set(info.adapted) == expected_default_targets(model)
    assert not any(re.search(r"mlp\.gate($|\.)", n) for n in info.adapted)
    assert "lm_head" not in info.adapted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not model.model.layers[1].mlp.gate.weight.requires_grad
    assert "routed experts 4" in info.summary


def test_trainable_count_matches_hand_count():
    model = tiny("v3")
    c = model.config
    r = 4
    info = apply_lora(model, LoraSettings(r=r))
    H, N, Q, C = c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank
    P, R, V, F, I, E = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.intermediate_size,
                        c.moe_intermediate_size, c.n_routed_experts)
    S = c.n_shared_experts * I
    lin = lambda i, o: r * (i + o)   # noqa: E731  A [r, in] + B [out, r]
    attn = lin(H, Q) + lin(Q, N * (P + R)) + lin(H, C + R) + lin(C, N * (P + V)) + lin(N * V, H)
    dense = 2 * lin(H, F) + lin(F, H)
    moe = 2 * lin(H, S) + lin(S, H) + E * r * (H + 2 * I) + E * r * (I + H)
    L, k = c.num_hidden_layers, c.first_k_dense_replace
    want = L * attn + k * dense + (L - k) * moe
    assert info.n_trainable == want == sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_total = sum(p.numel() for p in tiny("v3").parameters())
    assert info.n_total == base_total + want


def test_list_targets_follow_peft_semantics():
    """Exact name or '.'-suffix, as PEFT matches a list (checked on the transformers model)."""
    targets = ["o_proj", "self_attn.kv_b_proj", "layers.1.self_attn.q_a_proj", "model.layers.2.self_attn.q_b_proj"]
    hf = hf_model(v3_config())
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets))
    model = tiny("v3")
    with pytest.warns(UserWarning, match="no routed expert"):
        info = apply_lora(model, LoraSettings(r=2, target_modules=targets))
    assert sorted(info.adapted) == sorted(pm.base_model.targeted_module_names)
    assert len(info.adapted) == 3 + 3 + 1 + 1


def test_pattern_without_match_names_close_ones():
    model = tiny("v3")
    with pytest.raises(ConfigError, match="fullmatch") as e:
        apply_lora(model, LoraSettings(target_modules=r"self_attn\.o_proj"))
    assert "o_proj" in str(e.value) and "'.*'" in str(e.value)
    with pytest.raises(ConfigError, match="q_a_proj|q_b_proj"):
        apply_lora(model, LoraSettings(target_modules=["q_projj"]))
    with pytest.raises(ConfigError, match="nothing"):
        apply_lora(model, LoraSettings(target_modules="nothing"))
    with pytest.warns(UserWarning, match="router"):   # the router is not a candidate, but say so
        apply_lora(model, LoraSettings(target_modules=r".*\.mlp\.(gate|experts\.down_proj)"))
    assert not model.model.layers[1].mlp.gate.weight.requires_grad


def test_settings_are_validated():
    for bad in (dict(r=0), dict(dropout=1.0), dict(alpha=-1.0), dict(target_modules="(unclosed"),
                dict(target_modules=[]), dict(rank=4)):
        with pytest.raises(ValidationError):
            LoraSettings(**bad)
    with pytest.raises(ConfigError, match="lora.r must be >= 1"):
        make_lora_settings({"r": 0})
    assert re.fullmatch(DEFAULT_TARGETS, "model.layers.3.mlp.experts.gate_up_proj")
    assert not re.fullmatch(DEFAULT_TARGETS, "model.layers.3.mlp.gate")


def test_dropout_only_where_peft_allows_it(tmp_path):
    model = tiny("v3")
    with pytest.raises(ConfigError, match="dropout"):
        apply_lora(model, LoraSettings(dropout=0.1))
    assert not has_lora(model)
    settings = LoraSettings(dropout=0.5, target_modules=ATTN)
    with pytest.warns(UserWarning, match="no routed expert"):
        apply_lora(model, settings)
    randomize(model)
    ids = torch.randint(0, 160, (1, 12))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)        # dropout on the LoRA path
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    cfg = json.loads((save_adapter(model, tmp_path / "a", "base", settings) / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.5 and cfg["target_parameters"] == []


def test_already_adapted_and_tied_head_are_refused():
    model = tiny("v3")
    apply_lora(model, LoraSettings(r=2))
    with pytest.raises(ConfigError, match="already"):
        apply_lora(model, LoraSettings(r=2))
    hf_cfg = v3_config(tie_word_embeddings=True)
    tied = DeepSeekForCausalLM.from_config(config_from_hf(hf_cfg.to_dict()), seed=0)
    with pytest.raises(ConfigError, match="tied"):
        apply_lora(tied, LoraSettings(target_modules=["lm_head", "o_proj"]))


# ----------------------------------------------------------------------------------------------
# behaviour in memory
# ----------------------------------------------------------------------------------------------
def test_gradients_reach_every_adapter_and_only_them():
    model = tiny("v3")
    apply_lora(model, LoraSettings(r=2))
    randomize(model, 0.05)   # B != 0 so that A gets a gradient too
    model.train()
    ids = torch.randint(0, 160, (4, 24))
    model(ids).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_absorbed_attention_sees_the_adapter():
    """The absorbed MLA path reads kv_b_proj.weight directly: it must get W + s·BA."""
    model = tiny("v3")
    apply_lora(model, LoraSettings(r=2))
    randomize(model)
    ids = torch.randint(0, 160, (2, 12))
    attn = [layer.self_attn for layer in model.model.layers]
    outs = {}
    for impl in ("naive", "absorb"):
        for a in attn:
            a.impl = impl
        with torch.no_grad():
            outs[impl] = model(ids).logits
    torch.testing.assert_close(outs["absorb"], outs["naive"], atol=ATOL, rtol=0)


def test_merge_gives_a_plain_model_that_saves(tmp_path):
    model = tiny("v3")
    apply_lora(model, LoraSettings(r=2))
    randomize(model)
    ids = torch.randint(0, 160, (1, 16))
    with torch.no_grad():
        want = model(ids).logits
    assert merge_lora(model) is model
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert type(model.model.layers[1].mlp.experts).__name__ == "RoutedExperts"
    assert all(p.requires_grad for p in model.parameters())      # as before apply_lora
    assert not any("lora" in k for k in model.state_dict())
    moelab.save(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(moelab.load(tmp_path / "merged")(ids).logits, want, atol=ATOL, rtol=0)


def test_lora_stays_fp32_on_a_bf16_model():
    model = tiny("v3")
    apply_lora(model, LoraSettings(r=2))
    model.to(torch.bfloat16)
    assert model.model.layers[0].self_attn.o_proj._parameters["weight"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 160, (1, 8))).logits).all()


# ----------------------------------------------------------------------------------------------
# our own files
# ----------------------------------------------------------------------------------------------
def test_load_adapter_round_trip(tmp_path):
    settings = LoraSettings(r=3, alpha=7.5)
    model = tiny("v3")
    info = apply_lora(model, settings)
    randomize(model)
    save_adapter(model, tmp_path / "a", "base", settings)
    with safe_metadata(tmp_path / "a" / "adapter_model.safetensors") as meta:
        assert meta == {"format": "pt"}
    fresh = tiny("v3")
    back = load_adapter(fresh, tmp_path / "a")
    assert back.adapted == info.adapted and back.n_trainable == info.n_trainable
    ids = torch.randint(0, 160, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)
    save_adapter(fresh, tmp_path / "a", "base", settings)              # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


class safe_metadata:
    def __init__(self, path):
        from safetensors import safe_open
        self.f = safe_open(str(path), "pt")

    def __enter__(self):
        return self.f.metadata()

    def __exit__(self, *exc):
        return False


@pytest.fixture
def saved(tmp_path):
    model = tiny("v3")
    settings = LoraSettings(r=2)
    apply_lora(model, settings)
    randomize(model)
    return save_adapter(model, tmp_path / "good", "base", settings)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_bad_adapter_dirs_raise_checkpoint_errors(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_adapter(tiny("v3"), tmp_path / "nope")
    d = _copy(saved, tmp_path / "noconf")
    (d / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(tiny("v3"), d)
    d = _copy(saved, tmp_path / "badjson")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_adapter(tiny("v3"), d)
    d = _copy(saved, tmp_path / "pickle")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_adapter(tiny("v3"), d)
    d = _copy(saved, tmp_path / "notlora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="LoRA adapters only"):
        load_adapter(tiny("v3"), d)
    d = _copy(saved, tmp_path / "rank")
    (d / "adapter_config.json").write_text(json.dumps(cfg | {"r": 4}))
    with pytest.raises(CheckpointError, match="rank"):
        load_adapter(tiny("v3"), d)

    tensors = load_file(str(saved / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    for name, change in [
        ("shape", {key: torch.zeros(2, 63)}),
        ("unknown", {key.replace("o_proj", "p_proj"): tensors[key].clone(),
                     key.replace("o_proj", "p_proj").replace("lora_A", "lora_B"): torch.zeros(64, 2)}),
        ("expert_shape", {"base_model.model.model.layers.1.mlp.experts.lora_A.weight": torch.zeros(32, 50)}),
    ]:
        d = _copy(saved, tmp_path / name)
        save_file(tensors | change, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="lora_A|match no LoRA target"):
            load_adapter(tiny("v3"), d)
    d = _copy(saved, tmp_path / "truncated")
    raw = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_adapter(tiny("v3"), d)


def test_scaling_follows_rslora():
    assert LoraSettings(r=4, alpha=8).scaling == 2.0
    assert LoraSettings(r=4, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)


def test_default_targets_on_a_dense_gqa_model():
    from moelab.config import make_config

    cfg = make_config(dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, use_mla=False, rope_interleave=False,
                           n_routed_experts=0, max_position_embeddings=128))
    model = DeepSeekForCausalLM.from_config(cfg, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # no routed experts: nothing to warn about
        info = apply_lora(model, LoraSettings(r=2))
    assert set(info.adapted) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
