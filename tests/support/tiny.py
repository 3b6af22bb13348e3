"""The tiny DeepSeekMoE most tests train: MLA without q LoRA, 8 routed experts top-2 + 1 shared, sigmoid
routing with the loss-free bias, 2 layers of width 32 (about 0.1M parameters: a step takes milliseconds).
On sys.path through pytest's ``pythonpath = ["tests/support"]``; conftest.py offers it as fixtures.
"""

from __future__ import annotations

from moelab.config import ModelConfig, make_config

TINY_MOE = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                first_k_dense_replace=0, scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                initializer_range=0.05, max_position_embeddings=256)


def tiny_config(**overrides) -> ModelConfig:
    """:data:`TINY_MOE` with ``overrides`` applied."""
    return make_config({**TINY_MOE, **overrides})
