"""The DeepSeek-style model: RoPE/YaRN, MLA and MHA attention, DeepSeekMoE, the causal LM."""

from moelab.model.transformer import DeepSeekForCausalLM, LMOutput

__all__ = ["DeepSeekForCausalLM", "LMOutput"]
