"""LoRA adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<path>.lora_A.weight`` (A ``[r, in]``, stacked experts ``[r·E, in]``) and
``.lora_B.weight`` (B ``[out, r]`` / ``[out, r·E]``). PEFT 0.21 rewrites the config of a transformers v5
DeepSeek-V2/V3 model on load: any ``target_modules`` entry named ``gate_proj``, ``up_proj``, ``down_proj``
or ``gate`` is taken for a (v4) routed expert and moved to the fused expert parameters, so the dense MLP
and the shared experts cannot be targeted as modules. moelab therefore writes

* ``target_modules``: the full paths of the other adapted ``nn.Linear`` modules (attention, ...);
* ``target_parameters``: ``<path>.weight`` of adapted dense-MLP / shared-expert linears, and
  ``<layer>.mlp.experts.gate_up_proj`` / ``.down_proj`` for stacked experts.

Both expert parameters of one layer nest two PEFT wrappers: ``gate_up_proj`` is the inner one
(``mlp.experts.base_layer.lora_*``), ``down_proj`` the outer one (``mlp.experts.lora_*``); with only one of
them adapted its keys are ``mlp.experts.lora_*``. :func:`load_adapter` tells the two apart by their shapes.
PEFT's ``ParamWrapper`` refuses ``lora_dropout != 0``, so dropout works only when nothing is stored as a
parameter target (e.g. attention-only LoRA).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moelab.common.atomic import ADAPTER, write_dir
from moelab.common.jsonio import read_json
from moelab.errors import CheckpointError, ConfigError
from moelab.model.experts import RoutedExperts
from moelab.tune.lora.apply import LoraTarget, attach_adapters, candidate_targets, lora_info
from moelab.tune.lora.modules import EXPERT_PARAMS, LoraSlot, has_lora, lora_modules, lora_shapes
from moelab.tune.lora.settings import LoraInfo, LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")


def _adapted_targets(model: nn.Module) -> list[LoraTarget]:
    out = []
    for path, m in lora_modules(model):
        for name, slot in m.lora_slots.items():
            full = path if name == "weight" else f"{path}.{name}"
            out.append(LoraTarget(full, path, m, name, slot))
    return out


def _peft_prefix(t: LoraTarget, siblings: list[str]) -> str:
    """Module path of the PEFT wrapper that holds ``t``'s LoRA (nested ``base_layer`` for inner wrappers)."""
    if not t.stacked:
        return t.module_path
    order = [p for p in EXPERT_PARAMS if p in siblings]
    depth = len(order) - 1 - order.index(t.param)
    return t.module_path + ".base_layer" * depth


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names, ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``
    (detached; the model's dtype and device)."""
    out = {}
    for t in _adapted_targets(model):
        prefix = _peft_prefix(t, list(t.module.lora_slots))
        out[f"{_PREFIX}{prefix}.lora_A.weight"] = t.module.lora_A[t.param].detach()
        out[f"{_PREFIX}{prefix}.lora_B.weight"] = t.module.lora_B[t.param].detach()
    return out


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def adapter_config(model: nn.Module, base_model_name_or_path: str, settings: LoraSettings) -> dict:
    """The ``adapter_config.json`` contents that make PEFT rebuild this model's adapters.

    ``settings`` gives r, alpha, dropout and rsLoRA; adapters with another rank or alpha (e.g. loaded
    from a file) are listed in ``rank_pattern`` / ``alpha_pattern`` under their exact target key.
    """
    targets = _adapted_targets(model)
    if not targets:
        raise ConfigError("the model has no LoRA adapters to save; call apply_lora or load_adapter first")
    modules = [t.peft_key for t in targets if not t.peft_param]
    params = [t.peft_key for t in targets if t.peft_param]
    if settings.dropout > 0 and params:
        raise ConfigError(f"cannot save lora_dropout = {settings.dropout} together with parameter targets "
                          f"({params[0]}, ...): PEFT refuses dropout on them; use lora.dropout = 0")
    rank_pattern, alpha_pattern = {}, {}
    for t in targets:
        if t.slot.rslora != settings.use_rslora:
            raise ConfigError(f"{t.name} was adapted with use_rslora={t.slot.rslora} but the settings say "
                              f"{settings.use_rslora}; PEFT has one use_rslora per adapter")
        if t.slot.r != settings.r:
            rank_pattern[re.escape(t.peft_key)] = t.slot.r
        if t.slot.alpha != settings.alpha:
            alpha_pattern[re.escape(t.peft_key)] = _json_number(t.slot.alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings.r,
        "lora_alpha": _json_number(settings.alpha),
        "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": modules,
        "target_parameters": params,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str,
                 settings: LoraSettings, *, overwrite: bool = True) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) that
    ``peft.PeftModel.from_pretrained`` loads onto the transformers model of the base checkpoint.

    Written to a temporary sibling directory that replaces ``out_dir`` only when complete; an existing
    ``out_dir`` only if it holds an adapter and nothing else, and ``overwrite`` (:mod:`moelab.common.atomic`).
    """
    config = adapter_config(model, base_model_name_or_path, settings)
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    return write_dir(Path(out_dir), write, kind=ADAPTER, overwrite=overwrite)


def _read_adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    cfg = read_json(path, CheckpointError, missing=f"{directory} has no {ADAPTER_CONFIG}; give the directory "
                    "written by save_adapter or PEFT's save_pretrained")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {cfg.get('peft_type')!r}; moelab reads LoRA adapters only")
    unsupported = {"bias": lambda v: v not in (None, "none"), "fan_in_fan_out": bool, "use_dora": bool,
                   "lora_bias": bool, "modules_to_save": bool, "trainable_token_indices": bool,
                   "layer_replication": bool}
    bad = [k for k, test in unsupported.items() if k in cfg and test(cfg[k])]
    if bad:
        raise CheckpointError(f"{path} uses {', '.join(f'{k}={cfg[k]!r}' for k in bad)}, which moelab does not "
                              "support; merge the adapter with PEFT instead")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{path}: r must be a positive integer (got {r!r})")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise CheckpointError(f"{path}: lora_alpha must be a positive number (got {alpha!r})")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(k) or {}, dict):
            raise CheckpointError(f"{path}: {k} must be an object")
    return cfg


def _pattern_value(patterns: dict, keys: list[str], default):
    """PEFT's ``get_pattern_key`` rule: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p, v in (patterns or {}).items():
        if any(re.match(rf"(.*\.)?({p})$", k) for k in keys):
            return v
    return default


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoraInfo:
    """Load a LoRA adapter written by :func:`save_adapter` or PEFT (safetensors only) onto ``model``.

    The model must not carry adapters yet. Every tensor must belong to an ``nn.Linear`` module or a
    stacked expert parameter of ``model`` with the right shape; ranks come from the tensors and must
    agree with ``r`` / ``rank_pattern``; alpha from ``lora_alpha`` / ``alpha_pattern``. Base parameters
    are frozen and the adapters trainable, as after :func:`apply_lora`.
    """
    from moelab.interop.weights import iter_tensors

    directory = Path(adapter_dir)
    if not directory.is_dir():
        raise CheckpointError(f"adapter directory not found: {directory}")
    cfg = _read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in directory.glob("adapter_model.*")]
        extra = (f" ({', '.join(pickles)} is a pickle: moelab never unpickles files; re-save it with "
                 "safe_serialization=True)") if pickles else ""
        raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS}{extra}")
    if has_lora(model):
        raise ConfigError("the model already carries LoRA adapters; merge_lora(model) first or load the "
                          "adapter onto a fresh model")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t, _ in iter_tensors([weights]):
        m = _KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        tensors.setdefault(m.group(1), {})[m.group(2)] = t
    cands = {(c.module_path, c.param): c for c in candidate_targets(model)}
    modules = dict(model.named_modules())
    chosen: dict[tuple[str, str], tuple[LoraTarget, torch.Tensor, torch.Tensor]] = {}
    for prefix, ab in tensors.items():
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise CheckpointError(f"{weights.name}: {_PREFIX}{prefix} has no {missing}.weight")
        A, B = ab["lora_A"], ab["lora_B"]
        path = prefix
        while path.endswith(".base_layer"):
            path = path[: -len(".base_layer")]
        mod = modules.get(path)
        if mod is None or not (type(mod) is nn.Linear or isinstance(mod, RoutedExperts)):
            unknown.append(f"{_PREFIX}{prefix}.lora_A.weight")
            continue
        if A.ndim != 2 or B.ndim != 2:
            raise CheckpointError(f"{weights.name}: {prefix} LoRA tensors must be 2-D, got "
                                  f"{list(A.shape)} and {list(B.shape)}")
        if type(mod) is nn.Linear:
            if path != prefix:
                unknown.append(f"{_PREFIX}{prefix}.lora_A.weight")
                continue
            param = "weight"
        else:
            W_gu, W_d = mod._parameters["gate_up_proj"], mod._parameters["down_proj"]
            fits = [p for p, W in (("gate_up_proj", W_gu), ("down_proj", W_d))
                    if A.shape[1] == W.shape[2] and B.shape[0] == W.shape[1]]
            if not fits:
                raise CheckpointError(
                    f"{weights.name}: {prefix} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, which fit "
                    f"neither {path}.gate_up_proj {list(W_gu.shape)} nor .down_proj {list(W_d.shape)} "
                    "(expected lora_A [r·E, in], lora_B [out, r·E]); is it an adapter for this model?")
            param = fits[0]
        t = cands[(path, param)]
        W = mod._parameters[param]
        E = W.shape[0] if t.stacked else 1
        r = A.shape[0] // E
        want_a, want_b = lora_shapes(W, max(r, 1))
        if r < 1 or A.shape[0] % E or tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise CheckpointError(f"{weights.name}: {prefix} has lora_A {list(A.shape)} and lora_B "
                                  f"{list(B.shape)}; {t.name} {list(W.shape)} needs lora_A [r{'·E' * t.stacked}, "
                                  f"{W.shape[-1]}] and lora_B [{W.shape[-2]}, r{'·E' * t.stacked}]")
        if (path, param) in chosen:
            raise CheckpointError(f"{weights.name}: two adapters for {t.name}")
        chosen[(path, param)] = (t, A, B)
    if unknown:
        hint = ""
        if any(re.search(r"\.experts\.\d+\.", k) for k in unknown):
            hint = (" Per-expert keys (mlp.experts.<e>.<proj>) are the transformers v4 layout; load the adapter "
                    "with PEFT on transformers >= 5 (which fuses it) and save it again.")
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise CheckpointError(f"{weights.name} has tensor(s) that match no LoRA target of this model: "
                              f"{', '.join(unknown[:3])}{more}.{hint} Is it an adapter for this base model?")
    if not chosen:
        raise CheckpointError(f"{weights.name} holds no LoRA tensors")
    rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout") or 0.0)
    targets = []
    for t, A, B in chosen.values():
        keys = [t.name] if t.stacked else [t.module_path, f"{t.module_path}.weight"]
        r = A.shape[0] // (t.module._parameters[t.param].shape[0] if t.stacked else 1)
        want_r = _pattern_value(cfg.get("rank_pattern"), keys, cfg["r"])
        if want_r != r:
            raise CheckpointError(f"{directory / ADAPTER_CONFIG} gives rank {want_r} for {t.name} but its "
                                  f"tensors have rank {r}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), keys, cfg["lora_alpha"]))
        t.slot = LoraSlot(r, alpha, rslora, 0.0 if t.stacked else dropout)
        t.extra = {"A": A, "B": B}
        targets.append(t)
    order = {c.name: i for i, c in enumerate(candidate_targets(model))}
    targets.sort(key=lambda t: order[t.name])
    attach_adapters(model, targets)
    with torch.no_grad():
        for t in targets:
            t.module.lora_A[t.param].copy_(t.extra["A"])
            t.module.lora_B[t.param].copy_(t.extra["B"])
    return lora_info(model, [t.name for t in targets])
