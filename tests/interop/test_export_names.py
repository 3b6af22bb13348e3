"""What serving engines load: a moelab checkpoint — saved, exported from a sharded run, or merged from LoRA —
is a plain DeepSeek-V2/V3 Hugging Face checkpoint: transformers' own classes find exactly the tensors they
expect (no missing, no unexpected key) under the architecture config.json names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

import moelab
from moelab.model.transformer import DeepSeekForCausalLM

VARIANTS = {
    "v3-sigmoid": {},
    "v2-softmax": {"scoring_func": "softmax", "topk_method": "greedy", "model_type": "deepseek_v2",
                   "norm_topk_prob": False, "rope_interleave": True},     # (transformers' V2 never renormalises)
    "v3-q-lora-dense-first": {"q_lora_rank": 16, "first_k_dense_replace": 1},
}


def _keys(ckpt) -> set[str]:
    names = set()
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            names |= set(sf.keys())
    return names


def _on_disk(state: dict, n_experts: int) -> set[str]:
    """transformers' parameter names as the released checkpoints store them: its fused expert tensors
    (``experts.gate_up_proj`` / ``down_proj``) are per expert on disk (``experts.{e}.gate_proj.weight`` ...),
    which its loader converts."""
    out = set()
    for k in state:
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k.endswith(".experts.gate_up_proj"):
            out |= {f"{k[:-len('gate_up_proj')]}{e}.{w}.weight" for e in range(n_experts)
                    for w in ("gate_proj", "up_proj")}
        elif k.endswith(".experts.down_proj"):
            out |= {f"{k[:-len('down_proj')]}{e}.down_proj.weight" for e in range(n_experts)}
        else:
            out.add(k)
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_tensor_names_are_transformers(name, tmp_path):
    model = DeepSeekForCausalLM.from_config(tiny_config(**VARIANTS[name]), seed=0)
    out = moelab.save(model, tmp_path / name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [{"deepseek_v2": "DeepseekV2ForCausalLM",
                                     "deepseek_v3": "DeepseekV3ForCausalLM"}[cfg["model_type"]]]
    hf_cfg = AutoConfig.from_pretrained(out)
    assert _keys(out) == _on_disk(AutoModelForCausalLM.from_config(hf_cfg).state_dict(), hf_cfg.n_routed_experts)
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
