"""``torch.compile`` for the dense parts of a model's blocks (``train.compile = true``).

Each block's attention, its two RMSNorms, a dense SwiGLU MLP, the shared experts and the final norm are
compiled in place (``nn.Module.compile``: parameter names and checkpoints are unchanged). The router
and the routed experts stay eager: their shapes depend on the routing (``compile_experts`` fuses the
experts' elementwise math separately). Inductor fuses the norms, RoPE, casts and activations into
few loops; all blocks share one compiled graph per module kind, so the one-time cost does not grow
with depth.

Measured on the 2-core CPU (~100M-parameter config of benchmarks/train_step.py, batch 8 × 256):
bf16 autocast step 2,059 → 1,817 ms (1.13x), fp32 3,550 → 3,348 ms (1.06x), after 16-23 s of
compiling in the first step (and again at the first evaluation: no-grad is another graph). Off by
default: worth it for runs of many minutes, not for short ones; on the CPU it needs a C++ compiler.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from moelab.errors import TrainingError


def compile_dense_parts(model: nn.Module) -> int:
    """Compile the dense sub-modules of every decoder block in place; returns how many were compiled."""
    if model.device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        raise TrainingError("train.compile needs a C++ compiler on the CPU (none found as c++ or g++): "
                            "install one (apt install g++) or set train.compile = false")
    parts: list[nn.Module] = [model.model.norm]
    for layer in model.model.layers:
        parts += [layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm]
        if not hasattr(layer.mlp, "experts"):    # a dense SwiGLU block
            parts.append(layer.mlp)
        elif layer.mlp.shared_experts is not None:   # DeepSeekMoE: only the shared experts are dense
            parts.append(layer.mlp.shared_experts)
    for m in parts:
        m.compile()
    return len(parts)
