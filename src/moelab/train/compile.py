"""``torch.compile`` for training (``train.compile``): whole decoder blocks, or only their dense parts.

* ``true`` / ``"blocks"``: every decoder block (attention, norms, router, gating, permutation, routed and
  shared experts, combine) and the final norm are compiled whole. Inductor then fuses the elementwise
  work around the expert GEMMs too — routing softmax/sigmoid and top-k bookkeeping, the fp32 gate
  products, casts — which profiles on the GPU show as two thirds of an MoE layer's time. The whole
  model traces without a graph break on the GPU's path (bf16, tests/model/test_traceable.py). Where the
  experts cannot be traced they run eagerly between two compiled graphs: grouped_mm's compile-time rule
  takes only bf16 (fp32 CPU runs), and expert parallelism's exchange has data-dependent sizes.
* ``"dense"``: each block's attention, its two RMSNorms, a dense SwiGLU MLP, the shared experts and the
  final norm; the router and the routed experts stay eager (``compile_experts`` fuses the fused
  kernel's activation math separately).

Modules are compiled in place (``nn.Module.compile``: parameter names and checkpoints are unchanged);
blocks of one kind share a compiled graph, so the one-time cost does not grow with depth. It comes
again at the first evaluation (no-grad is another graph); nothing in a block may specialise the graph per
layer (the balancer counts into per-layer buffers for this reason; a test holds a 10-layer model to one
graph per block kind). With activation checkpointing each block's forward is compiled inside the
checkpoint, which stays eager. Works with FSDP2 and expert parallelism (tests: losses equal the eager
run's).

Measured on the 2-core CPU (Intel Xeon, AMX; ~100M-parameter config of benchmarks/train_step.py, batch
8 × 256, median of 5 steps; one run per setting): tokens/s eager / dense / blocks = 1,419 / 1,637 /
1,564 under bf16 autocast with fp32 weights and 1,487 / 1,681 / 1,818 with bf16 weights (moelab vs
transformers 1.77x / 2.05x / 2.09x and 2.51x / 3.16x / 3.37x; the two compiled runs are within this
machine's noise of each other under autocast). On the CPU each MoE block breaks once more, where bf16
expert groups are aligned (a host read). One MoE layer alone, bf16 forward + backward: 1.2-1.8x faster
compiled whole than eager. Off by default: worth it for runs of many minutes, not for short ones; on
the CPU it needs a C++ compiler.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from moelab.errors import TrainingError
from moelab.train.checkpointing import compile_inside, decoder_stack


def _check_compiler(model: nn.Module) -> None:
    if model.device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        raise TrainingError("train.compile needs a C++ compiler on the CPU (none found as c++ or g++): "
                            "install one (apt install g++) or set train.compile = false")


def compile_dense_parts(model: nn.Module) -> int:
    """Compile the dense sub-modules of every decoder block in place; returns how many were compiled."""
    _check_compiler(model)
    stack = decoder_stack(model)
    parts: list[nn.Module] = [stack.norm]
    for layer in stack.layers:
        parts += [layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm]
        if not hasattr(layer.mlp, "experts"):    # a dense SwiGLU block
            parts.append(layer.mlp)
        elif layer.mlp.shared_experts is not None:   # DeepSeekMoE: only the shared experts are dense
            parts.append(layer.mlp.shared_experts)
    for m in parts:
        m.compile()
    return len(parts)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile every decoder block whole (router and routed experts included) and the final norm, in
    place; returns how many modules were compiled. A checkpointed block (activation checkpointing, enabled
    first) gets its forward compiled inside the checkpoint."""
    _check_compiler(model)
    stack = decoder_stack(model)
    stack.norm.compile(**compile_kwargs)
    for block in stack.layers:
        if not compile_inside(block, **compile_kwargs):
            block.compile(**compile_kwargs)
    return 1 + len(stack.layers)


def compile_model(model: nn.Module, how: bool | str, **compile_kwargs) -> int:
    """``train.compile``: False (nothing), ``"dense"`` or ``"blocks"`` (True means blocks). ``compile_kwargs``
    go to ``torch.compile`` (whole blocks only; e.g. ``backend="aot_eager"`` in tests)."""
    if how is False:
        return 0
    return compile_dense_parts(model) if how == "dense" else compile_blocks(model, **compile_kwargs)
