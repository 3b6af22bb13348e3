"""Round trip between transformers and moelab on a tiny random DeepSeek-V3.

    python examples/hf_interop.py

Builds a DeepseekV3ForCausalLM with transformers, saves it, loads it with moelab, compares logits,
generates greedily with the MLA latent cache, saves it back and reopens it with transformers.
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

import moelab
from moelab.infer import SamplingConfig, generate

config = DeepseekV3Config(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    initializer_range=0.1)
torch.manual_seed(0)
hf = DeepseekV3ForCausalLM(config).eval()

with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(f"{tmp}/hf")
    model = moelab.load(f"{tmp}/hf")                      # DeepSeekForCausalLM, eval mode
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    print(f"max |logits difference| moelab vs transformers: {diff:.2e}")

    out = generate(model, ids, max_new_tokens=8, sampling=SamplingConfig(greedy=True))
    print("greedy continuation:", out[0, 12:].tolist())

    moelab.save(model, f"{tmp}/back")                     # a Hugging Face checkpoint again
    back = AutoModelForCausalLM.from_pretrained(f"{tmp}/back")
    print("reopened in transformers as", type(back).__name__)
