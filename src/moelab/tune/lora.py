"""LoRA for moelab models, written and read in PEFT's on-disk format (docs/methods.md §6).

Legend: r rank, E routed experts, H hidden, I expert width, ``in``/``out`` a weight's input/output size,
s the scaling ``alpha / r`` (rsLoRA: ``alpha / √r``).

    nn.Linear  W [out, in]:      y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ         A [r, in],   B [out, r]
    stacked experts W [E, out, in] (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]):
                                 W_e + s · B_e·A_e  for every expert e   A [r·E, in], B [out, r·E]
                                 A_e = A[e·r:(e+1)·r]  (rows grouped by expert)
                                 B_e = B.view(out, r, E)[:, :, e]  (columns: rank-major, expert fastest)

The expert layout is the one PEFT's ``ParamWrapper`` uses for a 3-D parameter of a transformers v5
model (``target_parameters``); A starts Kaiming-uniform (``a = √5``, as ``nn.Linear``) and B at zero, so a
fresh adapter changes nothing.

**In memory.** An adapted module keeps its class's behaviour and its parameter names: its class is
swapped for a LoRA subclass that adds ``lora_A`` / ``lora_B`` (``nn.ParameterDict`` keyed by the adapted
parameter's name: ``o_proj.lora_A.weight``, ``experts.lora_A.gate_up_proj``) and turns the adapted
parameter's attribute into the *effective* weight ``W + s·ΔW``. ``module.weight`` / ``experts.gate_up_proj``
therefore read the adapted weight wherever the model reads them (the absorbed-MLA path reads
``kv_b_proj.weight``; the fused expert kernels read ``gate_up_proj``), while ``state_dict`` still holds
the base tensor under its usual name. ``nn.Linear`` computes the low-rank path on the activations
(``B(A(dropout(x)))``: no full-size weight gradient); stacked experts use the effective weight, as PEFT
does. LoRA tensors are kept in fp32 when the base weights are bf16/fp16 (fp32 master weights).
``state_dict()`` holds the LoRA tensors next to the base ones (a training checkpoint resumes exactly);
call :func:`merge_lora` before ``moelab.save``, which would otherwise write them into the checkpoint.

**On disk** (``save_adapter``): ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``. PEFT 0.21 rewrites the config of a
transformers v5 DeepSeek-V2/V3 model on load: any ``target_modules`` entry named ``gate_proj``,
``up_proj``, ``down_proj`` or ``gate`` is taken for a (v4) routed expert and moved to the fused expert
parameters, so the dense MLP and the shared experts cannot be targeted as modules. moelab therefore writes

* ``target_modules``: the full paths of the other adapted ``nn.Linear`` modules (attention, ...);
* ``target_parameters``: ``<path>.weight`` of adapted dense-MLP / shared-expert linears, and
  ``<layer>.mlp.experts.gate_up_proj`` / ``.down_proj`` for stacked experts.

Both expert parameters of one layer nest two PEFT wrappers: ``gate_up_proj`` is the inner one
(``mlp.experts.base_layer.lora_*``), ``down_proj`` the outer one (``mlp.experts.lora_*``); with only one of
them adapted its keys are ``mlp.experts.lora_*``. ``load_adapter`` tells the two apart by their shapes.
PEFT's ``ParamWrapper`` refuses ``lora_dropout != 0``, so dropout works only when nothing is stored as a
parameter target (e.g. attention-only LoRA).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from safetensors.torch import save_file
from torch import nn

from moelab.common.atomic import ADAPTER, write_dir
from moelab.errors import CheckpointError, ConfigError
from moelab.model.experts import RoutedExperts

#: The default ``target_modules``: every attention projection (MLA and MHA/GQA names), the dense MLP,
#: the shared experts and the stacked routed experts -- every matrix of the decoder layers except the
#: router (``mlp.gate``), as in ESFT's LoRA baseline ("all weights except embeddings and the head").
#: Norms, embeddings and ``lm_head`` are not adapted.
DEFAULT_TARGETS = (
    r"model\.layers\.\d+\.(?:"
    r"self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.(?:shared_experts\.)?(?:gate_proj|up_proj|down_proj)"
    r"|mlp\.experts\.(?:gate_up_proj|down_proj))"
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
#: Leaf names PEFT maps to fused routed experts on DeepSeek-V2/V3 (transformers' qwen2_moe conversion).
_PEFT_REMAPPED_LEAVES = ("gate", "gate_proj", "up_proj", "down_proj")
#: Expert parameters in PEFT's nesting order, innermost wrapper first (their order in transformers' module).
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class LoraSettings(BaseModel):
    """The ``[lora]`` section.

    ``target_modules`` names what to adapt among the model's ``nn.Linear`` modules (by module path,
    e.g. ``model.layers.0.self_attn.o_proj``) and its stacked expert parameters (by parameter path,
    ``model.layers.1.mlp.experts.gate_up_proj``). A string is a regex that must match the whole name
    (``re.fullmatch``, as PEFT); a list entry matches a name exactly or as a ``.``-suffix (``"o_proj"``,
    ``"self_attn.kv_b_proj"``, ``"gate_up_proj"``), as PEFT's list form. The router is never adapted.
    The default (:data:`DEFAULT_TARGETS`) hits attention, the dense MLP, shared and routed experts.
    A routed-expert target gets a rank-r adapter per expert (``E·r·(in + out)`` parameters).
    ``dropout`` must be 0 when routed experts, the dense MLP or shared experts are adapted (PEFT's
    ``ParamWrapper`` cannot apply dropout to a weight).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = DEFAULT_TARGETS
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, v):
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("lora.target_modules is empty; give a regex or a list of module names")
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"lora.target_modules {v!r} is not a valid regex ({e}); a string is matched "
                                 "with re.fullmatch, a list by exact name or '.'-suffix") from None
        else:
            if not v or any(not isinstance(x, str) or not x.strip() for x in v):
                raise ValueError("lora.target_modules must be a regex or a non-empty list of non-empty names")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1 (got {self.r})")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a positive number (got {self.alpha}); the scaling is alpha/r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1) (got {self.dropout})")
        return self

    @property
    def scaling(self) -> float:
        """s = alpha/r (rsLoRA: alpha/√r)."""
        return _scaling(self.r, self.alpha, self.use_rslora)


def make_lora_settings(values: dict, where: str = "[lora]") -> LoraSettings:
    """:class:`LoraSettings` from a dict (a TOML section), with failures turned into a :class:`ConfigError`."""
    from moelab.config import _format_validation_error

    try:
        return LoraSettings(**values)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where, LoraSettings)) from None


def _scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass
class LoraInfo:
    """What :func:`apply_lora` / :func:`load_adapter` adapted.

    ``adapted``: module paths of adapted ``nn.Linear`` modules and parameter paths of adapted stacked
    experts, in model order; ``n_trainable`` / ``n_total``: parameter counts after adaptation (LoRA
    included, tied tensors once); ``summary``: a few human-readable lines.
    """

    adapted: list[str]
    n_trainable: int
    n_total: int
    summary: str = ""

    def __str__(self) -> str:
        return self.summary


# ----------------------------------------------------------------------------------------------
# the LoRA modules
# ----------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """Hyper-parameters of the adapter on one base parameter."""

    r: int
    alpha: float
    rslora: bool
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return _scaling(self.r, self.alpha, self.rslora)


def _lora_shapes(weight: torch.Tensor, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (A, B) for a base weight ``[out, in]`` or stacked ``[E, out, in]``."""
    if weight.ndim == 2:
        out, inn = weight.shape
        return (r, inn), (out, r)
    E, out, inn = weight.shape
    return (r * E, inn), (out, r * E)


def _effective_property(name: str) -> property:
    def get(self):
        return self._lora_effective(name)
    get.__doc__ = f"``{name}`` with its LoRA update added (``W + s·ΔW``); the base tensor is in ``_parameters``."
    return property(get)


class _LoraMixin:
    """Adapter state shared by :class:`LoraLinear` and :class:`LoraExperts` (see the module docstring).

    ``lora_A[name]`` / ``lora_B[name]`` hold the factors of the adapter on base parameter ``name``,
    ``lora_slots[name]`` its rank, alpha and dropout; ``_lora_orig_class`` the class to restore.
    """

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    lora_slots: dict[str, _Slot]

    def _lora_add(self, name: str, slot: _Slot, dtype: torch.dtype) -> None:
        W = self._parameters[name]
        a_shape, b_shape = _lora_shapes(W, slot.r)
        A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=W.device))
        B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=W.device))
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_slots[name] = slot

    def _lora_delta(self, name: str) -> torch.Tensor:
        """``s·ΔW`` in the LoRA dtype, shaped like the base parameter (differentiable)."""
        A, B = self.lora_A[name], self.lora_B[name]
        s = self.lora_slots[name].scaling
        W = self._parameters[name]
        if W.ndim == 2:
            return (B @ A) * s
        E, out, inn = W.shape
        r = A.shape[0] // E
        A_e = A.view(E, r, inn)                                   # expert-major rows
        B_e = B.view(out, r, E).permute(2, 0, 1)                  # [E, out, r]: rank-major columns
        return torch.bmm(B_e, A_e) * s                            # [E, out, in]

    def _lora_effective(self, name: str) -> torch.Tensor:
        W = self._parameters[name]
        if name not in self.lora_slots:
            return W
        cache = self.__dict__.get("_lora_cache")
        if cache is not None and name in cache:
            return cache[name]
        eff = W + self._lora_delta(name).to(W.dtype)
        if cache is not None:
            cache[name] = eff
        return eff

    @torch.no_grad()
    def _lora_fold(self, name: str) -> None:
        """``W += s·ΔW``, computed in (at least) fp32 and rounded once."""
        W = self._parameters[name]
        delta = self._lora_delta(name)
        dt = torch.promote_types(torch.promote_types(W.dtype, delta.dtype), torch.float32)
        W.copy_((W.to(dt) + delta.to(dt)).to(W.dtype))

    def _lora_params(self) -> Iterator[nn.Parameter]:
        for name in self.lora_slots:
            yield self.lora_A[name]
            yield self.lora_B[name]

    def _apply(self, fn, recurse=True):
        # keep fp32 LoRA tensors fp32 when the model is cast to bf16/fp16 (fp32 master weights)
        saved = {(d, k): p.data for d in ("lora_A", "lora_B") for k, p in getattr(self, d).items()
                 if p.dtype == torch.float32}
        super()._apply(fn, recurse)
        for (d, k), old in saved.items():
            p = getattr(self, d)[k]
            if p.dtype in _LOW_PRECISION:
                p.data = (p.data if old.is_meta else old).to(device=p.device, dtype=torch.float32)
        return self


class LoraLinear(_LoraMixin, nn.Linear):
    """An ``nn.Linear`` with a LoRA adapter: x ``[..., in]`` -> ``[..., out]``,
    ``x·Wᵀ + b + s·B(A(dropout(x)))`` with A ``[r, in]``, B ``[out, r]``.

    ``self.weight`` reads ``W + s·BA`` (no dropout); the base tensor stays ``_parameters["weight"]``.
    """

    weight = _effective_property("weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self._parameters["weight"], self.bias)
        A, B = self.lora_A["weight"], self.lora_B["weight"]
        h = self.lora_dropout(x).to(A.dtype)
        z = F.linear(F.linear(h, A), B) * self.lora_slots["weight"].scaling
        return y + z.to(y.dtype)

    def extra_repr(self) -> str:
        slot = self.lora_slots["weight"]
        return f"{super().extra_repr()}, lora_r={slot.r}, lora_scaling={slot.scaling:g}"


class LoraExperts(_LoraMixin, RoutedExperts):
    """:class:`~moelab.model.experts.RoutedExperts` with per-expert LoRA on ``gate_up_proj`` ``[E, 2I, H]``
    and/or ``down_proj`` ``[E, H, I]`` (A ``[r·E, in]``, B ``[out, r·E]``). The kernels read the effective
    weights, computed once per forward."""

    gate_up_proj = _effective_property("gate_up_proj")
    down_proj = _effective_property("down_proj")

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        self._lora_cache = {}
        try:
            return super().forward(x, indices, gates)
        finally:
            self._lora_cache = None


_EXPERT_CLASSES: dict[type, type] = {}


def _lora_class(module: nn.Module) -> type:
    if type(module) is nn.Linear:
        return LoraLinear
    cls = type(module)
    if cls is RoutedExperts:
        return LoraExperts
    if cls not in _EXPERT_CLASSES:  # a RoutedExperts subclass: put the LoRA behaviour in front of it
        _EXPERT_CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraExperts, cls), {})
    return _EXPERT_CLASSES[cls]


def _wrap(module: nn.Module, slots: dict[str, _Slot]) -> None:
    """Turn ``module`` into its LoRA subclass with fresh adapters (A Kaiming, B zero) on ``slots``."""
    orig = type(module)
    W0 = module._parameters[next(iter(slots))]
    dtype = torch.float32 if W0.dtype in _LOW_PRECISION else W0.dtype
    module.lora_A = nn.ParameterDict()
    module.lora_B = nn.ParameterDict()
    module.lora_slots = {}
    module._lora_orig_class = orig
    module._lora_cache = None
    if orig is nn.Linear:
        p = slots["weight"].dropout
        module.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
    module.__class__ = _lora_class(module)
    for name, slot in slots.items():
        module._lora_add(name, slot, dtype)


def _unwrap(module: _LoraMixin) -> None:
    orig = module._lora_orig_class
    del module.lora_A, module.lora_B
    if "lora_dropout" in module._modules:
        del module.lora_dropout
    for attr in ("lora_slots", "_lora_orig_class", "_lora_cache"):
        module.__dict__.pop(attr, None)
    module.__class__ = orig


def lora_modules(model: nn.Module) -> Iterator[tuple[str, _LoraMixin]]:
    """(path, module) of every module carrying LoRA adapters, in model order."""
    for name, m in model.named_modules():
        if isinstance(m, _LoraMixin):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B parameters of ``model`` (the only trainable ones after :func:`apply_lora`)."""
    return [p for _, m in lora_modules(model) for p in m._lora_params()]


# ----------------------------------------------------------------------------------------------
# choosing targets and adapting
# ----------------------------------------------------------------------------------------------
@dataclass
class _Target:
    name: str            # Linear: module path; experts: parameter path
    module_path: str
    module: nn.Module
    param: str           # "weight" or "gate_up_proj" / "down_proj"
    slot: _Slot | None = None
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


def _candidates(model: nn.Module) -> list[_Target]:
    """Everything LoRA can adapt: plain ``nn.Linear`` modules and the stacked expert parameters."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, _LoraMixin):
            raise ConfigError(f"{path} already carries a LoRA adapter; merge_lora(model) first, or start "
                              "from a model without adapters")
        if type(m) is nn.Linear:
            out.append(_Target(path, path, m, "weight"))
        elif isinstance(m, RoutedExperts):
            out += [_Target(f"{path}.{p}", path, m, p) for p in _EXPERT_PARAMS]
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


def _freeze(model: nn.Module) -> None:
    if "_lora_requires_grad" not in model.__dict__:
        model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)


def _attach(model: nn.Module, targets: list[_Target]) -> None:
    _freeze(model)
    by_module: dict[int, tuple[nn.Module, dict[str, _Slot]]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), (t.module, {}))[1][t.param] = t.slot
    for module, slots in by_module.values():
        _wrap(module, dict(sorted(slots.items(), key=lambda kv: _EXPERT_PARAMS.index(kv[0])
                                  if kv[0] in _EXPERT_PARAMS else 0)))
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
    cands = _candidates(model)
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
        c.slot = _Slot(settings.r, settings.alpha, settings.use_rslora, settings.dropout if not c.stacked else 0.0)
    _attach(model, chosen)
    if any(isinstance(m, RoutedExperts) for m in model.modules()) and not any(c.stacked for c in chosen):
        warnings.warn("LoRA adapts no routed expert although the model has routed experts; add "
                      "'mlp.experts.gate_up_proj' / 'mlp.experts.down_proj' targets to adapt them", stacklevel=2)
    return _info(model, [c.name for c in chosen])


def _info(model: nn.Module, adapted: list[str]) -> LoraInfo:
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
    hyper = ", ".join(f"r={r} alpha={a:g}{' (rsLoRA)' if rs else ''} scale={_scaling(r, a, rs):g}"
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
        _unwrap(m)
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


# ----------------------------------------------------------------------------------------------
# PEFT format
# ----------------------------------------------------------------------------------------------
def _adapted_targets(model: nn.Module) -> list[_Target]:
    out = []
    for path, m in lora_modules(model):
        for name, slot in m.lora_slots.items():
            full = path if name == "weight" else f"{path}.{name}"
            out.append(_Target(full, path, m, name, slot))
    return out


def _peft_prefix(t: _Target, siblings: list[str]) -> str:
    """Module path of the PEFT wrapper that holds ``t``'s LoRA (nested ``base_layer`` for inner wrappers)."""
    if not t.stacked:
        return t.module_path
    order = [p for p in _EXPERT_PARAMS if p in siblings]
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
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}; give the directory written by "
                              "save_adapter or PEFT's save_pretrained")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
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
    from moelab.interop.checkpoint import iter_tensors

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
    cands = {(c.module_path, c.param): c for c in _candidates(model)}
    modules = dict(model.named_modules())
    chosen: dict[tuple[str, str], tuple[_Target, torch.Tensor, torch.Tensor]] = {}
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
        want_a, want_b = _lora_shapes(W, max(r, 1))
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
        t.slot = _Slot(r, alpha, rslora, 0.0 if t.stacked else dropout)
        t.extra = {"A": A, "B": B}
        targets.append(t)
    order = {c.name: i for i, c in enumerate(_candidates(model))}
    targets.sort(key=lambda t: order[t.name])
    _attach(model, targets)
    with torch.no_grad():
        for t in targets:
            t.module.lora_A[t.param].copy_(t.extra["A"])
            t.module.lora_B[t.param].copy_(t.extra["B"])
    return _info(model, [t.name for t in targets])


__all__ = ["DEFAULT_TARGETS", "LoraExperts", "LoraInfo", "LoraLinear", "LoraSettings", "adapter_config",
           "adapter_state_dict", "apply_lora", "has_lora", "load_adapter", "lora_modules", "lora_parameters",
           "make_lora_settings", "merge_and_reinit", "merge_lora", "save_adapter"]
