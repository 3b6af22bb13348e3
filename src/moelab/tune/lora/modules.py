"""The LoRA modules: an ``nn.Linear`` or stacked routed experts with low-rank adapters on their weights.

Legend: r rank, E routed experts, ``in``/``out`` a weight's input/output size, s the scaling.

    nn.Linear  W [out, in]:      y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ         A [r, in],   B [out, r]
    stacked experts W [E, out, in] (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]):
                                 W_e + s · B_e·A_e  for every expert e   A [r·E, in], B [out, r·E]
                                 A_e = A[e·r:(e+1)·r]  (rows grouped by expert)
                                 B_e = B.view(out, r, E)[:, :, e]  (columns: rank-major, expert fastest)

An adapted module keeps its class's behaviour and its parameter names: :func:`wrap_module` swaps its class
for a LoRA subclass that adds ``lora_A`` / ``lora_B`` (``nn.ParameterDict`` keyed by the adapted
parameter's name) and turns the adapted parameter's attribute into the *effective* weight ``W + s·ΔW``,
while ``_parameters`` (and ``state_dict``) keep the base tensor. A starts Kaiming-uniform (``a = √5``), B
at zero; LoRA tensors are fp32 when the base weights are bf16/fp16. :func:`unwrap_module` restores the
original class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab.model.experts import RoutedExperts
from moelab.tune.lora.settings import lora_scaling

#: Expert parameters in PEFT's nesting order, innermost wrapper first (their order in transformers' module).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class LoraSlot:
    """Hyper-parameters of the adapter on one base parameter."""

    r: int
    alpha: float
    rslora: bool
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)


def lora_shapes(weight: torch.Tensor, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
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


class LoraMixin:
    """Adapter state shared by :class:`LoraLinear` and :class:`LoraExperts` (see the module docstring).

    ``lora_A[name]`` / ``lora_B[name]`` hold the factors of the adapter on base parameter ``name``,
    ``lora_slots[name]`` its rank, alpha and dropout; ``_lora_orig_class`` the class to restore.
    """

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    lora_slots: dict[str, LoraSlot]

    def _lora_add(self, name: str, slot: LoraSlot, dtype: torch.dtype) -> None:
        W = self._parameters[name]
        a_shape, b_shape = lora_shapes(W, slot.r)
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


class LoraLinear(LoraMixin, nn.Linear):
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


class LoraExperts(LoraMixin, RoutedExperts):
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


def wrap_module(module: nn.Module, slots: dict[str, LoraSlot]) -> None:
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


def unwrap_module(module: LoraMixin) -> None:
    """Remove the adapters of ``module`` (without folding them) and restore its original class."""
    orig = module._lora_orig_class
    del module.lora_A, module.lora_B
    if "lora_dropout" in module._modules:
        del module.lora_dropout
    for attr in ("lora_slots", "_lora_orig_class", "_lora_cache"):
        module.__dict__.pop(attr, None)
    module.__class__ = orig


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraMixin]]:
    """(path, module) of every module carrying LoRA adapters, in model order."""
    for name, m in model.named_modules():
        if isinstance(m, LoraMixin):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B parameters of ``model`` (the only trainable ones after :func:`apply_lora`)."""
    return [p for _, m in lora_modules(model) for p in m._lora_params()]
