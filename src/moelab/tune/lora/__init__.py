"""LoRA for moelab models, written and read in PEFT's on-disk format (docs/methods.md §6).

Legend: r rank, E routed experts, H hidden, I expert width, ``in``/``out`` a weight's input/output size,
s the scaling ``alpha / r`` (rsLoRA: ``alpha / √r``).

    nn.Linear  W [out, in]:      y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ         A [r, in],   B [out, r]
    stacked experts W [E, out, in] (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]):
                                 W_e + s · B_e·A_e  for every expert e   A [r·E, in], B [out, r·E]

The expert layout is the one PEFT's ``ParamWrapper`` uses for a 3-D parameter of a transformers v5
model (``target_parameters``); A starts Kaiming-uniform (``a = √5``, as ``nn.Linear``) and B at zero, so a
fresh adapter changes nothing.

**In memory** (:mod:`~moelab.tune.lora.modules`). An adapted module keeps its class's behaviour and its
parameter names: its class is swapped for a LoRA subclass that adds ``lora_A`` / ``lora_B``
(``nn.ParameterDict`` keyed by the adapted parameter's name: ``o_proj.lora_A.weight``,
``experts.lora_A.gate_up_proj``) and turns the adapted parameter's attribute into the *effective* weight
``W + s·ΔW``. ``module.weight`` / ``experts.gate_up_proj`` therefore read the adapted weight wherever the
model reads them (the absorbed-MLA path reads ``kv_b_proj.weight``; the fused expert kernels read
``gate_up_proj``), while ``state_dict`` still holds the base tensor under its usual name. ``nn.Linear``
computes the low-rank path on the activations (``B(A(dropout(x)))``: no full-size weight gradient);
stacked experts use the effective weight, as PEFT does. LoRA tensors are kept in fp32 when the base
weights are bf16/fp16 (fp32 master weights). ``state_dict()`` holds the LoRA tensors next to the base
ones (a training checkpoint resumes exactly); call :func:`merge_lora` before ``moelab.save``, which would
otherwise write them into the checkpoint.

**On disk** (:mod:`~moelab.tune.lora.peft`): ``save_adapter`` / ``load_adapter`` write and read
``adapter_config.json`` + ``adapter_model.safetensors`` that PEFT opens on the transformers model.

Modules: :mod:`.settings` (the ``[lora]`` section), :mod:`.modules` (the LoRA layers), :mod:`.apply`
(targets, :func:`apply_lora`, merging), :mod:`.peft` (the PEFT format).
"""

from moelab.tune.lora.apply import apply_lora, merge_and_reinit, merge_lora
from moelab.tune.lora.modules import LoraExperts, LoraLinear, has_lora, lora_modules, lora_parameters
from moelab.tune.lora.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    adapter_state_dict,
    load_adapter,
    save_adapter,
)
from moelab.tune.lora.settings import DEFAULT_TARGETS, LoraInfo, LoraSettings, make_lora_settings

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "LoraExperts", "LoraInfo", "LoraLinear",
           "LoraSettings", "adapter_config", "adapter_state_dict", "apply_lora", "has_lora", "load_adapter",
           "lora_modules", "lora_parameters", "make_lora_settings", "merge_and_reinit", "merge_lora", "save_adapter"]
