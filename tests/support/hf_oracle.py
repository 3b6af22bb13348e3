"""transformers' DeepseekV2/V3 models on tiny random configs: the independent oracle of the parity tests
(tests/interop/test_hf_parity.py) and of the PEFT tests (tests/tune/test_lora.py). On sys.path through
pytest's ``pythonpath = ["tests/support"]``.
"""

from __future__ import annotations

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
              max_position_embeddings=256, initializer_range=0.1, first_k_dense_replace=1)


def v3_config(**kw):
    base = dict(COMMON, q_lora_rank=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True)
    return DeepseekV3Config(**{**base, **kw})


def v2_config(**kw):
    base = dict(COMMON, q_lora_rank=None, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=3,
                topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)
    return DeepseekV2Config(**{**base, **kw})


def hf_model(config, random_bias: bool = True):
    torch.manual_seed(1)
    cls = DeepseekV3ForCausalLM if isinstance(config, DeepseekV3Config) else DeepseekV2ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias") and random_bias:
                buf.copy_(torch.randn_like(buf) * 0.3)  # HF's zero init would hide bias bugs
    return model
