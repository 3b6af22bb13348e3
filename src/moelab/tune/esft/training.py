"""ESFT training: only the selected routed experts (and switched-on modules) are trainable.

Legend: E routed experts, H hidden, I expert width, n experts selected in a layer.

:func:`apply_esft` freezes every parameter, then makes the selected routed experts trainable through a
parametrization of the stacked ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]``: the
frozen stacked tensor stays where it was (``experts.parametrizations.<name>.original``) and a trainable
``rows [n, ...]`` tensor (``experts.parametrizations.<name>.0.rows``) is scattered into it on each
forward. The optimizer therefore sees exactly the selected experts' weights: AdamW's weight decay and
moments never touch a frozen expert. Routing stays free — the router still sends tokens to every expert;
the frozen ones simply do not change. Switches (ESFT Table 3, as in the released ``to_esft``):

* ``shared_experts`` — the layer's shared experts train too;
* ``non_expert_modules`` — everything that is not a routed or shared expert trains too: attention,
  norms, embeddings, LM head, the dense FFN layers and the routers' weights.

The loss-free balancing bias ``e_score_correction_bias`` is a buffer, never a trainable parameter here;
ESFT keeps it fixed (u = 0), which is the training loop's ``balance`` setting, not this module's.
While ESFT is applied, ``model.state_dict()`` holds the parametrization names; :func:`remove_esft` folds
the trained rows back into the plain stacked parameters (then ``moelab.save`` works as usual).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from moelab.errors import ConfigError
from moelab.model.moe import DeepSeekMoE
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.esft.layers import STACKED, check_model, is_expert_name, moe_layers
from moelab.tune.esft.selection import validate_expert_config


class SelectedRows(nn.Module):
    """Parametrization of a stacked expert tensor: frozen base ``[E, ...]`` -> the base with rows ``ids``
    replaced by the trainable ``rows`` ``[n, ...]`` (``index_copy``, differentiable in ``rows`` only).

    While its experts module runs a forward pass the result is computed once and reused (the ``loop``
    kernel reads one expert at a time); outside a forward it is recomputed on every access.
    """

    def __init__(self, base: torch.Tensor, ids: list[int]):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.device), persistent=False)
        self.rows = nn.Parameter(base.detach().index_select(0, self.ids).clone())
        self._cache: torch.Tensor | None = None
        self._caching = False

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self._cache is not None:
            return self._cache
        w = base.index_copy(0, self.ids, self.rows)
        if self._caching:
            self._cache = w
        return w


@dataclass
class EsftState:
    """Kept on the model while ESFT is applied: the config, every parameter's former ``requires_grad``,
    the forward hooks of the parametrized experts."""

    config: dict
    requires_grad: dict[str, bool]
    hooks: list = field(default_factory=list)


@dataclass
class EsftInfo:
    """What :func:`apply_esft` made trainable."""

    experts: dict[int, list[int]]          # decoder layer -> trainable routed expert ids
    shared_experts: bool
    non_expert_modules: bool
    n_trainable: int                       # trainable parameters (elements)
    n_total: int                           # parameters of the model
    experts_per_layer: dict[int, int]      # decoder layer -> number of trainable experts
    n_experts: int                         # routed experts per layer (E)

    @property
    def summary(self) -> str:
        counts = list(self.experts_per_layer.values())
        mean = sum(counts) / len(counts) if counts else 0.0
        extra = [s for s, on in (("shared experts", self.shared_experts),
                                 ("non-expert modules", self.non_expert_modules)) if on]
        return (f"ESFT: {sum(counts)} of {len(counts) * self.n_experts} routed experts trainable "
                f"({mean:.2f} per layer over {len(counts)} MoE layers)"
                + (f" + {' + '.join(extra)}" if extra else "")
                + f"; {self.n_trainable:,} of {self.n_total:,} parameters "
                  f"({100 * self.n_trainable / max(self.n_total, 1):.2f}%)")

    def __str__(self) -> str:
        return self.summary


def applied_esft(model) -> EsftState | None:
    """What :func:`apply_esft` applied to ``model`` (its config and saved flags); None without ESFT."""
    return getattr(model, "_esft_state", None)


def apply_esft(model: DeepSeekForCausalLM, expert_config: dict) -> EsftInfo:
    """Freeze ``model`` except the experts (and switched-on modules) of ``expert_config``.

    Afterwards ``[p for p in model.parameters() if p.requires_grad]`` is exactly what trains: one
    ``rows`` tensor ``[n, 2I, H]`` and one ``[n, H, I]`` per layer with selected experts, plus the
    shared-expert / non-expert parameters when switched on. Layers missing from the configuration
    (or listed with ``[]``) train no routed expert. Undo with :func:`remove_esft`.
    """
    check_model(model)
    if applied_esft(model) is not None:
        raise ConfigError("ESFT is already applied to this model; call remove_esft(model) first")
    cfg = validate_expert_config(expert_config, model)
    layers = moe_layers(model)
    n_total = sum(p.numel() for p in model.parameters())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    if not any(cfg["experts"].values()) and not cfg["shared_experts"] and not cfg["non_expert_modules"]:
        raise ConfigError("the expert config selects no expert and no other module: nothing would train. "
                          "Select experts with `moelab esft select` (a larger --p selects more)")
    _freeze_except_switches(model, cfg, layers)
    state = EsftState(cfg, flags)
    model._esft_state = state
    for layer, ids in cfg["experts"].items():
        if ids:
            state.hooks += _parametrize(layers[int(layer)].experts, ids)
    per_layer = {i: len(cfg["experts"].get(str(i), [])) for i in layers}
    return EsftInfo(experts={int(k): list(v) for k, v in cfg["experts"].items() if v},
                    shared_experts=cfg["shared_experts"], non_expert_modules=cfg["non_expert_modules"],
                    n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                    n_total=n_total, experts_per_layer=per_layer, n_experts=model.config.n_routed_experts)


def _freeze_except_switches(model: DeepSeekForCausalLM, cfg: dict, layers: dict[int, DeepSeekMoE]) -> None:
    """Freeze every parameter, then unfreeze the shared experts / non-expert modules the switches name."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg["non_expert_modules"]:
        for name, p in model.named_parameters():
            if not is_expert_name(name):
                p.requires_grad_(True)
    if cfg["shared_experts"]:
        for moe in layers.values():
            if moe.shared_experts is not None:
                moe.shared_experts.requires_grad_(True)


def esft_row_masks(model: DeepSeekForCausalLM) -> dict[str, torch.Tensor]:
    """ESFT as whole stacked expert tensors with row masks, for a torchrun job (:mod:`moelab.train.frozen_rows`).

    Undoes the ``rows`` parametrization of :func:`apply_esft` (the model must not have trained yet) and
    makes trainable exactly: ``experts.gate_up_proj`` / ``down_proj`` of the layers with selected experts,
    plus the switched-on modules. Returns ``{parameter name: bool [E]}`` (True: a selected expert); the
    caller zeroes the other rows' gradients and decays only the selected rows."""
    state = applied_esft(model)
    if state is None:
        raise ConfigError("ESFT is not applied to this model (apply_esft first)")
    cfg = state.config
    remove_esft(model)
    layers = moe_layers(model)
    _freeze_except_switches(model, cfg, layers)
    names = {m: n for n, m in model.named_modules()}
    E = model.config.n_routed_experts
    masks = {}
    for layer, ids in cfg["experts"].items():
        if not ids:
            continue
        experts = layers[int(layer)].experts
        mask = torch.zeros(E, dtype=torch.bool)
        mask[list(ids)] = True
        for name in STACKED:
            getattr(experts, name).requires_grad_(True)
            masks[f"{names[experts]}.{name}"] = mask
    return masks


def _parametrize(experts: nn.Module, ids: list[int]) -> list:
    for name in STACKED:
        base = getattr(experts, name)
        base.requires_grad_(False)
        parametrize.register_parametrization(experts, name, SelectedRows(base, ids))
    rows = [experts.parametrizations[name][0] for name in STACKED]

    def start(module, args):
        for r in rows:
            r._caching, r._cache = True, None

    def stop(module, args, output):
        for r in rows:
            r._caching, r._cache = False, None

    return [experts.register_forward_pre_hook(start), experts.register_forward_hook(stop, always_call=True)]


def remove_esft(model: DeepSeekForCausalLM) -> None:
    """Fold the trained experts into the plain stacked parameters and undo :func:`apply_esft`.

    The model's parameters get their names and ``requires_grad`` flags back, with the trained values;
    ``moelab.save(model, ...)`` then writes a full checkpoint. A model without ESFT is left as it is.
    """
    state = applied_esft(model)
    if state is None:
        return
    for h in state.hooks:
        h.remove()
    for moe in moe_layers(model).values():
        experts = moe.experts
        if not parametrize.is_parametrized(experts):
            continue
        for name in STACKED:
            plist = experts.parametrizations[name]
            sel = plist[0]
            with torch.no_grad():
                plist.original.index_copy_(0, sel.ids, sel.rows.detach().to(plist.original.dtype))
            parametrize.remove_parametrizations(experts, name, leave_parametrized=False)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    del model._esft_state
