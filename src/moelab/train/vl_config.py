"""Typed configuration of a vision-language training stage (``moelab vl train CONFIG``, docs/methods.md §12).

Sections::

    [vl]         stage = "align" | "pretrain" | "sft"; init_from = a VL checkpoint (the previous stage's
                 RUN_DIR/model), else the model sections below describe a fresh model (beside init_from
                 they must describe the checkpoint's model: one file serves every stage); train_encoder
    [model] [vision] [projector] [processor]      a fresh model (:mod:`moelab.model.vl_config`)
    [data]       path (JSON Lines, :mod:`moelab.train.vl_data`), val_path or val_fraction, seq_len, template,
                 packing, skip_malformed, tokenizer (a tokenizer.json for a fresh model)
    [train]      the optimisation recipe (as for pre-training)
    [balance]    expert balancing of the language model (as in pre-training; align: none, the LM is frozen)

DeepSeek-VL2's stages (arXiv 2412.10302 §4):

=========  ==============================================  ==========  =====================================
stage      trains                                          template    balancing
=========  ==============================================  ==========  =====================================
align      the adaptor, image_newline, view_separator and  plain       none (the language model is frozen)
           the encoder (``vl.train_encoder``)
pretrain   everything (VL data mixed with text-only)       plain       ``[balance]`` as in pre-training
sft        everything                                      deepseek    ``[balance]`` as in pre-training
=========  ==============================================  ==========  =====================================

Whether stage 1 trains the encoder is set by ``vl.train_encoder`` (default true: the VL2 paper trains the
SigLIP encoder with the adaptor in stage 1, where DeepSeek-VL trained the adaptor alone — METHODS §12 does
not pin it down, so it is a setting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moelab.config import format_validation_error, read_toml
from moelab.errors import ConfigError
from moelab.train.config import BalanceConfig, RecordDataConfig, TrainConfig, apply_overrides

Stage = Literal["align", "pretrain", "sft"]
STAGES = ("align", "pretrain", "sft")
MODEL_SECTIONS = ("model", "vision", "projector", "processor")
SECTIONS = {"vl", "data", "train", "balance", *MODEL_SECTIONS}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class VLSection(_Section):
    stage: Stage = "sft"
    init_from: str | None = None        # a VL checkpoint directory; else the model sections
    train_encoder: bool = True          # align stage: the encoder trains with the adaptor


class VLDataConfig(RecordDataConfig):
    template: Literal["auto", "plain", "deepseek"] = "auto"     # auto: deepseek for sft, else plain
    tokenizer: str | None = None        # tokenizer.json for a fresh model (default: byte-level + VL tokens)


class VLTrainConfig(TrainConfig):
    batch_size: int = 8
    warmup_steps: int = 20
    lr_schedule: Literal["multistep", "cosine", "wsd", "constant"] = "cosine"
    eval_every: int = 50
    ckpt_every: int = 100


class VLRunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vl: VLSection = VLSection()
    data: VLDataConfig
    train: VLTrainConfig
    balance: BalanceConfig = BalanceConfig()
    model_sections: dict[str, Any] = {}     # [model] [vision] [projector] [processor], parsed by VLConfig

    @property
    def template(self) -> str:
        if self.data.template != "auto":
            return self.data.template
        return "deepseek" if self.vl.stage == "sft" else "plain"

    @model_validator(mode="after")
    def _check(self):
        if self.vl.init_from is None and "model" not in self.model_sections:
            raise ValueError("describe a fresh model in [model] (with [vision], [projector], [processor]), or set "
                             "vl.init_from to a VL checkpoint (e.g. the previous stage's RUN_DIR/model)")
        if self.train.init_from is not None:
            raise ValueError("use vl.init_from (a VL checkpoint), not train.init_from")
        if self.vl.stage == "align" and self.balance.method != "none":
            raise ValueError(f"stage align freezes the language model, so its experts cannot be balanced "
                             f"(balance.method = {self.balance.method!r}); set balance.method = 'none' or leave "
                             "[balance] out")
        return self


def load_vl_run_config(path: str | Path, overrides: list[str] = ()) -> VLRunConfig:
    """Read a VL stage config (module docstring), apply ``--set`` overrides."""
    data = apply_overrides(read_toml(path, SECTIONS, require_model=False), list(overrides))
    for name, hint in (("data", "path = 'vl-data/train.jsonl'"), ("train", "steps = 100")):
        if name not in data:
            raise ConfigError(f"{path} has no [{name}] section; add one with at least {hint}")
    stage = data.get("vl", {}).get("stage", "sft")
    if stage == "align":
        data.setdefault("balance", {}).setdefault("method", "none")
    data["model_sections"] = {k: data.pop(k) for k in MODEL_SECTIONS if k in data}
    try:
        return VLRunConfig(**data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), VLRunConfig)) from None


__all__ = ["STAGES", "VLDataConfig", "VLRunConfig", "VLSection", "VLTrainConfig", "load_vl_run_config"]
