"""Where a moelab model keeps its mixture-of-experts blocks: decoder-layer index -> DeepSeekMoE.

One finder for every stage that observes or changes routed experts (routing analysis, ESFT). It only
finds; what a caller needs the experts for decides what it says when a model has none.
"""

from __future__ import annotations

from moelab.model.moe import DeepSeekMoE
from moelab.model.transformer import DeepSeekForCausalLM


def moe_layers(model: DeepSeekForCausalLM) -> dict[int, DeepSeekMoE]:
    """Decoder-layer index -> the :class:`DeepSeekMoE` block of that layer, in layer order.

    Dense layers are left out, so a model without routed experts gives ``{}``. ``model`` is a moelab
    :class:`DeepSeekForCausalLM` (callers check that first, with their own message).
    """
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, DeepSeekMoE)}


__all__ = ["moe_layers"]
