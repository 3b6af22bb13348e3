"""The ``[lora]`` settings: what to adapt (``target_modules``), rank r, alpha, dropout, rsLoRA.

The scaling of an adapter is ``s = alpha / r`` (rsLoRA: ``alpha / √r``); :class:`LoraInfo` reports what
:func:`~moelab.tune.lora.apply_lora` / :func:`~moelab.tune.lora.load_adapter` adapted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from moelab.errors import ConfigError

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


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """s = alpha/r (rsLoRA: alpha/√r)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


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
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def make_lora_settings(values: dict, where: str = "[lora]") -> LoraSettings:
    """:class:`LoraSettings` from a dict (a TOML section), with failures turned into a :class:`ConfigError`."""
    from moelab.config import format_validation_error

    try:
        return LoraSettings(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where, LoraSettings)) from None


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
