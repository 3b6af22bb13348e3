"""Choosing LoRA targets, adapting a model (:func:`apply_lora`) and folding the adapters back (merging).

A target is one adaptable weight: an ``nn.Linear`` module's ``weight`` ``[out, in]`` (named by module path)
or a stacked expert parameter ``gate_up_proj`` ``[E, 2I, H]`` / ``down_proj`` ``[E, H, I]`` (named by
parameter path). Adapting freezes every base parameter and makes only the LoRA factors trainable;
:func:`merge_lora` folds ``W += s·BA`` (fp32) and gives every parameter its ``requires_grad`` back.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from moelab.errors import ConfigError
from moelab.model.experts import RoutedExperts
from moelab.tune.lora.modules import (
    EXPERT_PARAMS,
    LoraMixin,
    LoraSlot,
    lora_modules,
    lora_parameters,
    unwrap_module,
    wrap_module,
)
from moelab.tune.lora.settings import LoraInfo, LoraSettings, lora_scaling

#: Leaf names PEFT maps to fused routed experts on DeepSeek-V2/V3 (transformers' qwen2_moe conversion).
_PEFT_REMAPPED_LEAVES = ("gate", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# choosing targets
# ----------------------------------------------------------------------------------------------
@dataclass
class LoraTarget:
    """One adaptable weight of a model, and (once chosen) its adapter's hyper-parameters."""

    name: str            # Linear: module path; experts: parameter path
    module_path: str
    module: nn.Module
    param: str           # "weight" or "gate_up_proj" / "down_proj"
    slot: LoraSlot | None = None
    extra: dict = field(default_factory=dict)

    @property
    def stacked(self) -> bool:
        return self.param != "weight"

    @property
    def peft_param(self) -> bool:
        """Whether PEFT must reach this weight through ``target_parameters``."""
        return self.stacked or self.module_path.rsplit(".", 1)[-1] in _PEFT_REMAPPED_LEAVES

    @property
    def peft_key(self) -> str:
        """The entry for PEFT's ``target_modules`` (a module path) or ``target_parameters`` (a parameter path)."""
        if self.stacked:
            return self.name
        return f"{self.module_path}.weight" if self.peft_param else self.module_path


def candidate_targets(model: nn.Module) -> list[LoraTarget]:
    """Everything LoRA can adapt: plain ``nn.Linear`` modules and the stacked expert parameters."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, LoraMixin):
            raise ConfigError(f"{path} already carries a LoRA adapter; merge_lora(model) first, or start "
                              "from a model without adapters")
        if type(m) is nn.Linear:
            out.append(LoraTarget(path, path, m, "weight"))
        elif isinstance(m, RoutedExperts):
            out += [LoraTarget(f"{path}.{p}", path, m, p) for p in EXPERT_PARAMS]
    return out


def _router_names(model: nn.Module) -> list[str]:
    from moelab.model.router import Router

    return [path for path, m in model.named_modules() if isinstance(m, Router)]


def _matches(pattern: str | list[str], name: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _no_match_error(pattern: str | list[str], names: list[str]) -> ConfigError:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(pattern, str):
        partial = [n for n in names if re.search(pattern, n)]
        plain = re.sub(r"\\(.)", r"\1", re.sub(r"[\^$*+?()\[\]{}|]", "", pattern))
        close = difflib.get_close_matches(plain, names, n=3, cutoff=0.0)
        close += [x for x in difflib.get_close_matches(plain.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)]
        hint = (f" It matches part of {partial[0]!r}, but a string must match the WHOLE name (re.fullmatch): "
                f"try '.*' in front, e.g. {'.*' + pattern!r}." if partial else "")
        what = f"regex {pattern!r}"
    else:
        close = [c for p in pattern for c in difflib.get_close_matches(p, leaves + names, n=2, cutoff=0.5)]
        hint = ""
        what = f"list {pattern!r}"
    close = list(dict.fromkeys(close))[:5]
    return ConfigError(
        f"lora.target_modules {what} matches none of the model's {len(names)} adaptable weights{hint} Closest "
        f"names: {', '.join(close) if close else '(none)'}. A string is a regex matched against the whole "
        "name (module paths like 'model.layers.0.self_attn.o_proj', stacked experts like "
        "'model.layers.1.mlp.experts.gate_up_proj'); a list entry matches a name exactly or as a '.'-suffix "
        "(e.g. ['o_proj', 'gate_up_proj']).")


# ----------------------------------------------------------------------------------------------
# adapting
# ----------------------------------------------------------------------------------------------
def _freeze(model: nn.Module) -> None:
    if "_lora_requires_grad" not in model.__dict__:
        model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)


def attach_adapters(model: nn.Module, targets: list[LoraTarget]) -> None:
    """Freeze ``model`` and give every target (its ``slot`` set) a fresh, trainable adapter."""
    _freeze(model)
    by_module: dict[int, tuple[nn.Module, dict[str, LoraSlot]]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), (t.module, {}))[1][t.param] = t.slot
    for module, slots in by_module.values():
        wrap_module(module, dict(sorted(slots.items(), key=lambda kv: EXPERT_PARAMS.index(kv[0])
                                        if kv[0] in EXPERT_PARAMS else 0)))
    for p in lora_parameters(model):
        p.requires_grad_(True)


def apply_lora(model: nn.Module, settings: LoraSettings) -> LoraInfo:
    """Add LoRA adapters (A Kaiming-uniform, B zero: the model's function is unchanged) to the weights
    matched by ``settings.target_modules`` and freeze every other parameter.

    Raises :class:`ConfigError` when nothing matches (with the closest names), when the model already
    has adapters, when the tied ``lm_head`` is targeted, or when ``dropout > 0`` meets a weight PEFT can
    only adapt through ``target_parameters``. Warns when a model with routed experts gets none adapted.
    """
    if not isinstance(settings, LoraSettings):
        raise ConfigError(f"apply_lora wants LoraSettings, got {type(settings).__name__}")
    cands = candidate_targets(model)
    names = [c.name for c in cands]
    pattern = settings.target_modules
    chosen = [c for c in cands if _matches(pattern, c.name)]
    if not chosen:
        raise _no_match_error(pattern, names)
    if isinstance(pattern, list):
        unused = [p for p in pattern if not any(_matches([p], c.name) for c in cands)]
        if unused:
            warnings.warn(f"lora.target_modules entries {unused} match nothing in this model", stacklevel=2)
    routers = [n for n in _router_names(model) if _matches(pattern, n)]
    if routers:
        warnings.warn(f"lora.target_modules matches the router ({routers[0]}, ...): moelab never adapts the "
                      "router (mlp.gate); it stays frozen", stacklevel=2)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False) and any(c.name == "lm_head" for c in chosen):
        raise ConfigError("lora.target_modules matches lm_head, whose weight is tied to the embeddings; "
                          "LoRA on a tied weight is not supported — leave lm_head out")
    if settings.dropout > 0:
        bad = [c.name for c in chosen if c.peft_param]
        if bad:
            raise ConfigError(
                f"lora.dropout = {settings.dropout} cannot be used with {bad[0]} (and {len(bad) - 1} more): "
                "PEFT reaches routed experts, and on DeepSeek models also the dense MLP and shared experts, "
                "through target_parameters (ParamWrapper), which cannot apply dropout to a weight. Set "
                "lora.dropout = 0, or restrict lora.target_modules to attention projections")
    for c in chosen:
        c.slot = LoraSlot(settings.r, settings.alpha, settings.use_rslora, settings.dropout if not c.stacked else 0.0)
    attach_adapters(model, chosen)
    if any(isinstance(m, RoutedExperts) for m in model.modules()) and not any(c.stacked for c in chosen):
        warnings.warn("LoRA adapts no routed expert although the model has routed experts; add "
                      "'mlp.experts.gate_up_proj' / 'mlp.experts.down_proj' targets to adapt them", stacklevel=2)
    return lora_info(model, [c.name for c in chosen])


def lora_info(model: nn.Module, adapted: list[str]) -> LoraInfo:
    """Parameter counts and a summary of ``model`` after adapting the weights named in ``adapted``."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    groups = {"attention": 0, "dense MLP": 0, "shared experts": 0, "routed experts": 0, "other": 0}
    for n in adapted:
        if ".self_attn." in n:
            groups["attention"] += 1
        elif ".mlp.shared_experts." in n:
            groups["shared experts"] += 1
        elif ".mlp.experts." in n:
            groups["routed experts"] += 1
        elif ".mlp." in n:
            groups["dense MLP"] += 1
        else:
            groups["other"] += 1
    slots = {(s.r, s.alpha, s.rslora) for _, m in lora_modules(model) for s in m.lora_slots.values()}
    hyper = ", ".join(f"r={r} alpha={a:g}{' (rsLoRA)' if rs else ''} scale={lora_scaling(r, a, rs):g}"
                      for r, a, rs in sorted(slots))
    parts = ", ".join(f"{k} {v}" for k, v in groups.items() if v)
    summary = (f"LoRA {hyper}: {len(adapted)} weights ({parts})\n"
               f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    return LoraInfo(adapted, trainable, total, summary)


# ----------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += s·BA`` in fp32) and remove the adapters.

    Afterwards ``model`` is a plain moelab model again (``moelab.save`` writes it) and every parameter
    has the ``requires_grad`` it had before :func:`apply_lora`. Returns ``model``.
    """
    for _, m in list(lora_modules(model)):
        for name in m.lora_slots:
            m._lora_fold(name)
        unwrap_module(m)
    flags = model.__dict__.pop("_lora_requires_grad", None)
    if flags is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
    return model


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> None:
    """PeriodicLoRA's stage end: ``W += s·BA``, redraw A (Kaiming-uniform, ``a = √5``), zero B.

    Function-preserving (up to rounding of the fold). The LoRA parameters are changed in place, so an
    optimizer holding them keeps working.
    """
    for _, m in lora_modules(model):
        for name in m.lora_slots:
            m._lora_fold(name)
            nn.init.kaiming_uniform_(m.lora_A[name], a=math.sqrt(5))
            m.lora_B[name].zero_()
