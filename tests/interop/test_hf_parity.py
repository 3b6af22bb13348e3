"""Logits and generation parity with transformers' DeepseekV2/V3 on tiny random configs (fp32, CPU).

transformers is the independent oracle: its models are built and initialised by transformers,
saved with ``save_pretrained`` and loaded with ``moelab.load`` (HF -> moelab), and moelab's random
models are saved with ``moelab.save`` and opened with ``AutoModelForCausalLM`` (moelab -> HF).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_oracle import COMMON, hf_model, v2_config, v3_config  # noqa: E402  (tests/support)
from transformers import AutoModelForCausalLM  # noqa: E402

import moelab  # noqa: E402
from moelab.config import make_config  # noqa: E402
from moelab.infer import SamplingConfig, generate  # noqa: E402
from moelab.interop.checkpoint import iter_tensors, weight_files  # noqa: E402
from moelab.model.transformer import DeepSeekForCausalLM  # noqa: E402

ATOL = 1e-5
YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = {**YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}

CASES = {
    "v2_softmax_greedy_no_qlora": lambda: v2_config(),
    "v2_group_limited_greedy": lambda: v2_config(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                                 topk_group=2, routed_scaling_factor=16.0),
    "v2_yarn": lambda: v2_config(rope_parameters=YARN_V2),
    "v3_noaux_tc_interleave": lambda: v3_config(),
    "v3_noaux_tc_halves": lambda: v3_config(rope_interleave=False),
    "v3_yarn_two_dense": lambda: v3_config(rope_parameters=YARN_V3, first_k_dense_replace=2),
    "v3_tied_unnormalised": lambda: v3_config(tie_word_embeddings=True, norm_topk_prob=False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn_impl", ["absorb", "naive", "auto"])
def test_hf_to_moelab_logits(case, attn_impl, tmp_path):
    hf = hf_model(CASES[case]())
    hf.save_pretrained(tmp_path)
    ours = moelab.load(tmp_path, attn_impl=attn_impl)
    ids = torch.randint(0, 160, (2, 24))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids).logits
    assert ref.abs().max() > 0.5, "logits too small for a meaningful comparison"
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["v2_group_limited_greedy", "v3_noaux_tc_interleave", "v3_yarn_two_dense"])
def test_moelab_to_hf_logits(case, tmp_path):
    from moelab.interop.hf_config import config_from_hf

    cfg = config_from_hf(CASES[case]().to_dict())
    ours = DeepSeekForCausalLM.from_config(cfg, seed=3)
    with torch.no_grad():  # a non-zero bias must survive export
        for m in ours.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.3)
    moelab.save(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("DeepseekV3ForCausalLM" if case.startswith("v3") else "DeepseekV2ForCausalLM")
    ids = torch.randint(0, 160, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_round_trip_keeps_every_tensor(tmp_path):
    hf = hf_model(v3_config())
    hf.save_pretrained(tmp_path / "hf")
    moelab.save(moelab.load(tmp_path / "hf"), tmp_path / "back")
    a = {k: t for k, t, _ in iter_tensors(weight_files(tmp_path / "hf"))}
    b = {k: t for k, t, _ in iter_tensors(weight_files(tmp_path / "back"))}
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert b["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_sharded_checkpoint_loads_in_both(tmp_path):
    cfg = make_config(COMMON | dict(q_lora_rank=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                    n_group=2, topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc"))
    ours = DeepSeekForCausalLM.from_config(cfg, seed=0)
    moelab.save(ours, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    back = moelab.load(tmp_path)
    ids = torch.randint(0, 160, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["v2_group_limited_greedy", "v3_noaux_tc_interleave"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    hf = hf_model(CASES[case]())
    hf.save_pretrained(tmp_path)
    ours = moelab.load(tmp_path)
    prompt = torch.randint(2, 160, (1, 7))
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=32)
    got = generate(ours, prompt, 32, SamplingConfig(greedy=True), eos_token_id=None)
    assert got.shape == (1, 39)
    assert got.tolist() == ref.tolist()


def test_cli_greedy_matches_transformers_generate(tmp_path):
    import subprocess
    import sys

    hf = hf_model(CASES["v3_yarn_two_dense"]())
    hf.save_pretrained(tmp_path)
    prompt = [5, 17, 42, 99]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=16)[0, 4:].tolist()
    res = subprocess.run([sys.executable, "-m", "moelab.cli", "generate", str(tmp_path), "--prompt-ids",
                          ",".join(map(str, prompt)), "--greedy", "-n", "16"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = [int(t) for t in res.stdout.strip().splitlines()[-1].split(",")]
    # the CLI stops at the checkpoint's EOS (id 1); transformers was told not to
    assert got == ref[:len(got)] and (len(got) == 16 or got[-1] == 1)


def test_dense_gqa_path_matches_transformers_llama():
    """The MHA/GQA path (use_mla=false, half-rotation RoPE, dense SwiGLU) is exactly a Llama block:
    transformers' LlamaForCausalLM is its oracle. Parameter names coincide, so weights copy across."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()
    cfg = make_config(dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, use_mla=False, rope_interleave=False,
                           n_routed_experts=0, max_position_embeddings=128, rms_norm_eps=1e-6))
    ours = DeepSeekForCausalLM.from_config(cfg).eval()
    missing, unexpected = ours.load_state_dict(llama.state_dict(), strict=False)
    assert not missing and not [k for k in unexpected if "rotary" not in k]
    ids = torch.randint(0, 160, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, llama(ids).logits, atol=ATOL, rtol=0)
        ref = llama.generate(ids[:1, :5], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, ids[:1, :5], 12, SamplingConfig(greedy=True)).tolist() == ref.tolist()


@pytest.mark.parametrize("kw", [dict(n_routed_experts=0), dict(n_shared_experts=0)])
def test_dense_and_unshared_models_export_to_transformers(kw, tmp_path):
    from moelab.interop.hf_config import config_from_hf

    cfg = config_from_hf(v3_config().to_dict()).model_copy(update=kw)
    cfg = make_config(cfg.model_dump())
    ours = DeepSeekForCausalLM.from_config(cfg, seed=2)
    moelab.save(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "again")          # transformers' own files load back into moelab
    back = moelab.load(tmp_path / "again")
    ids = torch.randint(0, 160, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)


def test_bf16_load_keeps_router_fp32(tmp_path):
    hf_model(v3_config()).save_pretrained(tmp_path)
    m = moelab.load(tmp_path, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
