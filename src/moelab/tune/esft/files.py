"""ESFT directories: save the trained tensors, load them strictly, merge them into the base checkpoint.

An ESFT directory holds ``expert_cfg.json`` (the expert configuration) and ``model.safetensors`` with only
the trained tensors under the base checkpoint's Hugging Face names
(``model.layers.{L}.mlp.experts.{e}.gate_proj.weight`` / ``up_proj`` ``[I, H]``, ``down_proj`` ``[H, I]``,
plus the shared-expert and non-expert tensors when those switches are on). It loads strictly
(:func:`load_esft_into`); :func:`merge_esft` writes a full Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from moelab.common.atomic import CHECKPOINT, ESFT, check_output_dir, write_dir
from moelab.errors import CheckpointError, ConfigError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.esft.layers import STACKED, check_model, is_expert_name, moe_layers
from moelab.tune.esft.selection import read_expert_config, validate_expert_config
from moelab.tune.esft.training import applied_esft

EXPERT_CONFIG = "expert_cfg.json"
WEIGHTS = "model.safetensors"
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _expert_weights(experts: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s current (gate_up ``[2I, H]``, down ``[H, I]``), read without building the stack."""
    out = []
    for name in STACKED:
        if parametrize.is_parametrized(experts, name):
            plist = experts.parametrizations[name]
            sel = plist[0]
            hit = (sel.ids == e).nonzero()
            out.append(sel.rows[int(hit[0, 0])] if hit.numel() else plist.original[e])
        else:
            out.append(getattr(experts, name)[e])
    return out[0], out[1]


def _config_for(model: DeepSeekForCausalLM, expert_config: dict | None) -> dict:
    state = applied_esft(model)
    if expert_config is None:
        if state is None:
            raise ConfigError("pass the expert config: ESFT is not applied to this model, so it does not say "
                              "which experts were trained")
        return state.config
    cfg = validate_expert_config(expert_config, model)
    if state is not None and cfg != state.config:
        raise ConfigError("the expert config differs from the one applied to this model (apply_esft); "
                          "pass the same config, or None to use the applied one")
    return cfg


def esft_state_dict(model: DeepSeekForCausalLM, expert_config: dict | None = None) -> dict[str, torch.Tensor]:
    """The trained routed experts under Hugging Face names, split from the stacked tensors.

    ``{"model.layers.{L}.mlp.experts.{e}.gate_proj.weight": [I, H], ...up_proj...: [I, H],
    ...down_proj...: [H, I]}`` for exactly the experts of ``expert_config`` (default: the config given to
    :func:`apply_esft`). Tensors are detached copies.
    """
    cfg = _config_for(model, expert_config)
    layers = moe_layers(model)
    I = model.config.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in sorted(cfg["experts"], key=int):
            experts = layers[int(layer)].experts
            for e in cfg["experts"][layer]:
                gate_up, down = _expert_weights(experts, e)
                prefix = f"model.layers.{layer}.mlp.experts.{e}"
                out[f"{prefix}.gate_proj.weight"] = gate_up[:I].detach().clone()
                out[f"{prefix}.up_proj.weight"] = gate_up[I:].detach().clone()
                out[f"{prefix}.down_proj.weight"] = down.detach().clone()
    return out


def _module_tensors(model: DeepSeekForCausalLM, cfg: dict) -> dict[str, torch.Tensor]:
    """Shared-expert and non-expert parameters under their (Hugging Face) names, as switched on."""
    out = {}
    for name, p in model.named_parameters():            # tied LM head: listed once, as the embedding
        shared = ".mlp.shared_experts." in name
        if (shared and cfg["shared_experts"]) or (not is_expert_name(name) and cfg["non_expert_modules"]):
            out[name] = p.detach().clone()
    return out


def save_esft(model: DeepSeekForCausalLM, expert_config: dict | None, out_dir: str | os.PathLike, *,
              overwrite: bool = True) -> Path:
    """Write an ESFT directory: ``expert_cfg.json`` + ``model.safetensors`` with only the trained tensors.

    Written to a temporary sibling directory renamed into place. An existing ``out_dir`` is replaced only
    if it holds an ESFT result and nothing else, and ``overwrite`` is true (:mod:`moelab.common.atomic`).
    """
    cfg = _config_for(model, expert_config)
    tensors = {k: v.to("cpu").contiguous() for k, v in
               (esft_state_dict(model, cfg) | _module_tensors(model, cfg)).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / EXPERT_CONFIG).write_text(json.dumps(cfg) + "\n", encoding="utf-8")

    return write_dir(Path(out_dir), write, kind=ESFT, overwrite=overwrite)


def load_esft_into(model: DeepSeekForCausalLM, esft_dir: str | os.PathLike) -> dict:
    """Copy an ESFT directory's tensors into ``model`` (in place), strictly; returns its expert config.

    Every tensor must name a parameter of the model with the same shape, every expert the config lists
    must be present with all three projections, and nothing else may be there. Load before
    :func:`apply_esft` (to continue training, apply the config afterwards).
    """
    from moelab.interop.weights import iter_tensors, weight_files

    check_model(model)
    d = Path(esft_dir)
    if not d.is_dir():
        raise CheckpointError(f"ESFT directory not found: {d} (expected {EXPERT_CONFIG} + {WEIGHTS})")
    if applied_esft(model) is not None:
        raise ConfigError("ESFT is applied to this model; load the ESFT weights first, then apply_esft "
                          "(or call remove_esft(model) before loading)")
    cfg = read_expert_config(d / EXPERT_CONFIG, model)
    layers = moe_layers(model)
    mcfg = model.config
    I, H = mcfg.moe_intermediate_size, mcfg.hidden_size
    expected = {(int(layer), e, proj) for layer, ids in cfg["experts"].items() for e in ids
                for proj in ("gate_proj", "up_proj", "down_proj")}
    modules = {name: p for name, p in model.named_parameters() if ".mlp.experts." not in name}
    wanted = set(_module_tensors(model, cfg))
    seen_experts: set[tuple[int, int, str]] = set()
    seen: set[str] = set()
    for name, t, path in iter_tensors(weight_files(d)):
        m = _EXPERT_KEY.match(name)
        if m:
            L, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            if L not in layers or e >= layers[L].experts.n_experts:
                raise CheckpointError(f"{path.name}: {name} does not exist in the base model "
                                      f"({len(layers)} MoE layers, {mcfg.n_routed_experts} experts each); "
                                      "was it trained from another base?")
            if (L, e, proj) not in expected:
                raise CheckpointError(f"{path.name}: {name} is an expert that {EXPERT_CONFIG} does not select "
                                      f"(layer {L} trains {cfg['experts'].get(str(L), [])}); the directory "
                                      "is inconsistent, save it again")
            want = (H, I) if proj == "down_proj" else (I, H)
            if tuple(t.shape) != want:
                raise CheckpointError(f"{path.name}: {name} has shape {list(t.shape)}, the base model expects "
                                      f"{list(want)}; was it trained from another base?")
            experts = layers[L].experts
            with torch.no_grad():
                if proj == "down_proj":
                    experts.down_proj[e].copy_(t)
                else:
                    rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                    experts.gate_up_proj[e, rows].copy_(t)
            seen_experts.add((L, e, proj))
            continue
        if name not in modules:
            raise CheckpointError(f"{path.name}: {name} does not exist in the base model; was it trained from "
                                  "another base?")
        if name not in wanted:
            switch = "shared_experts" if ".mlp.shared_experts." in name else "non_expert_modules"
            raise CheckpointError(f"{path.name}: holds {name}, but {EXPERT_CONFIG} has {switch} false; "
                                  "the directory is inconsistent, save it again")
        target = modules[name]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{path.name}: {name} has shape {list(t.shape)}, the base model expects "
                                  f"{list(target.shape)}; was it trained from another base?")
        with torch.no_grad():
            target.copy_(t)
        seen.add(name)
    missing = [f"model.layers.{L}.mlp.experts.{e}.{proj}.weight" for L, e, proj in sorted(expected - seen_experts)]
    missing += sorted(wanted - seen)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{d} is missing tensor(s) its {EXPERT_CONFIG} calls for: "
                              f"{', '.join(missing[:3])}{more}; save it again with save_esft")
    return cfg


def merge_esft(base_dir: str | os.PathLike, esft_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
               dtype: torch.dtype | str | None = None, progress: bool = False, overwrite: bool = False) -> Path:
    """Write a full Hugging Face checkpoint: the base with the ESFT tensors in place.

    The base is read with ``moelab.load`` (its stored dtype unless ``dtype``), the ESFT directory strictly
    (:func:`load_esft_into`), and the result written with ``moelab.save`` (atomically), with the base's
    tokenizer files when it has them. ``out_dir`` must differ from both inputs; an existing one is
    replaced only if it is a moelab checkpoint and ``overwrite`` is true.
    """
    from moelab.interop.checkpoint import load, save

    base, esft, out = Path(base_dir), Path(esft_dir), Path(out_dir)
    for src, what in ((base, "base checkpoint"), (esft, "ESFT directory")):
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise CheckpointError(f"--out {out} is the {what}; write the merged checkpoint to a new directory")
    check_output_dir(out, CHECKPOINT, overwrite)
    model = load(base, dtype=dtype, progress=progress)
    load_esft_into(model, esft)
    tokenizer = base if (base / "tokenizer.json").is_file() else None
    return save(model, out, tokenizer=tokenizer, overwrite=overwrite)
