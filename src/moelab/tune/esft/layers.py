"""The MoE layers ESFT works on: decoder-layer index -> :class:`~moelab.model.moe.DeepSeekMoE` block.

Layers are named by their decoder-layer index ("1".."26" for DeepSeek-V2-Lite, whose layer 0 is dense).
The stacked routed-expert parameters of a block are ``experts.gate_up_proj`` ``[E, 2I, H]`` and
``experts.down_proj`` ``[E, H, I]`` (E routed experts, H hidden, I expert width).
"""

from __future__ import annotations

from moelab.errors import ConfigError
from moelab.model import layers as model_layers
from moelab.model.moe import DeepSeekMoE
from moelab.model.transformer import DeepSeekForCausalLM

#: The stacked routed-expert parameters of ``DeepSeekMoE.experts``.
STACKED = ("gate_up_proj", "down_proj")


def check_model(model) -> DeepSeekForCausalLM:
    """``model`` itself when it is a moelab model; a ConfigError otherwise."""
    if not isinstance(model, DeepSeekForCausalLM):
        raise ConfigError(f"ESFT works on moelab models, got {type(model).__name__}; load the checkpoint "
                          "with moelab.load")
    return model


def moe_layers(model: DeepSeekForCausalLM) -> dict[int, DeepSeekMoE]:
    """Decoder-layer index -> its :class:`DeepSeekMoE` block (dense layers are left out), as found by
    :func:`moelab.model.layers.moe_layers`.

    Raises ConfigError when ``model`` is not a moelab model or has no routed experts at all.
    """
    check_model(model)
    layers = model_layers.moe_layers(model)
    if not layers:
        cfg = model.config
        raise ConfigError(
            f"ESFT needs routed experts; this model (n_routed_experts={cfg.n_routed_experts}, "
            f"{cfg.num_hidden_layers} layers, first_k_dense_replace={cfg.first_k_dense_replace}) has none. "
            "Use a mixture-of-experts checkpoint such as DeepSeek-V2-Lite")
    return layers


def is_expert_name(name: str) -> bool:
    """Whether parameter ``name`` belongs to a routed or shared expert."""
    return ".mlp.experts." in name or ".mlp.shared_experts." in name
