"""Typed configuration of a fine-tuning run (``moelab finetune {full,lora,plora,esft,dpo,grpo} CONFIG``).

Sections::

    [finetune]  base = checkpoint directory (moelab or a transformers DeepseekV2/V3 export)
    [data]      the SFT file (chat or prompt/completion JSON Lines), template, packing, seq_len,
                and optionally a token directory whose validation split measures forgetting
    [train]     the optimisation recipe (as for pre-training; fine-tuning defaults below)
    [balance]   expert balancing during fine-tuning (default "none": the routing bias stays put)
    [lora]      LoRA settings (methods lora and plora)
    [plora]     PeriodicLoRA settings (method plora)
    [esft]      ESFT expert configuration (method esft)
    [dpo]       DPO settings (method dpo): beta, loss, label smoothing, what trains
    [grpo]      GRPO settings (method grpo): group size, sampling, clip, KL β, iterations μ, rewards, what trains
    [parallel]  under torchrun: dp × ep, FSDP2 or DDP (as for pre-training; :mod:`moelab.dist.mesh`)

The method comes from the command line (``moelab finetune lora ...``), or ``finetune.method``.

Learning-rate defaults follow the ESFT paper (docs/methods.md §5): full 3e-5, LoRA/PeriodicLoRA 1e-4, ESFT
1e-5, constant schedule, no warm-up. They were chosen for a 16B model; small models want more (the
configs in ``configs/finetune-*.toml`` set their own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moelab.config import RuntimeSettings, format_validation_error, non_finite_settings, read_toml
from moelab.dist.mesh import ParallelConfig
from moelab.errors import ConfigError
from moelab.train.config import BalanceConfig, RecordDataConfig, TrainConfig, apply_overrides
from moelab.tune.lora import LoraSettings
from moelab.tune.plora import PLoraSettings

Method = Literal["full", "lora", "plora", "esft", "dpo", "grpo"]
METHODS = ("full", "lora", "plora", "esft", "dpo", "grpo")
DEFAULT_LR = {"full": 3e-5, "lora": 1e-4, "plora": 1e-4, "esft": 1e-5, "dpo": 5e-6, "grpo": 1e-6}
SECTIONS = {"finetune", "data", "train", "balance", "lora", "plora", "esft", "dpo", "grpo", "runtime", "parallel"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class FinetuneSection(_Section):
    method: Method | None = None
    base: str                          # checkpoint directory to start from


class SFTDataConfig(RecordDataConfig):
    """SFT data (see :mod:`moelab.data.sft`): JSON Lines ``{"messages": [...]}`` or ``{"prompt", "completion"}``
    (DPO: preference pairs; GRPO: prompts), rendered with ``template``; ``general_path`` is a token directory
    whose validation split measures forgetting."""

    template: Literal["deepseek", "plain"] = "deepseek"
    general_path: str | None = None


class FinetuneTrainConfig(TrainConfig):
    """:class:`~moelab.train.config.TrainConfig` with fine-tuning defaults (ESFT ``base.yaml``)."""

    batch_size: int = 8
    lr_schedule: Literal["multistep", "cosine", "wsd", "constant"] = "constant"
    warmup_steps: int = 0
    eval_every: int = 50
    ckpt_every: int = 100


class EsftSection(_Section):
    """``expert_config``: the JSON written by ``moelab esft select`` (``{"experts": {layer: [ids]}, ...}``)."""

    expert_config: str | None = None


class DPOSettings(_Section):
    """``[dpo]``: Direct Preference Optimization (DeepSeek LLM: one epoch, LR 5e-6, batch 512, warm-up +
    cosine). ``data.path`` is a preference JSON Lines file (:mod:`moelab.data.prefs`); the reference is
    ``reference`` (a checkpoint with the policy's tokenizer) or, by default, the base model, its
    log-probabilities computed once before training. ``train`` picks what learns: every weight, LoRA adapters
    ([lora]) or the selected experts ([esft])."""

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    reference: str | None = None
    train: Literal["full", "lora", "esft"] = "full"

    @model_validator(mode="after")
    def _check(self):
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be > 0 (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        return self


class GRPOSettings(_Section):
    """``[grpo]``: Group Relative Policy Optimization (DeepSeekMath; DeepSeek-Coder-V2 §3.3). Each sample
    batch draws ``train.batch_size × train.grad_accum / group`` prompts from ``data.path`` and ``group``
    completions of each from the policy (``temperature``, ``top_p``, at most ``max_new_tokens``), scores
    them by rule (``reward``) and trains ``iterations`` (μ) optimizer steps on them: the clipped objective
    (``clip_eps``) with a k3 KL penalty (``beta``) to the reference (``reference``, default the base).

    ``reward``: ``auto`` (rows with ``tests`` run them in the sandbox; others are exact-match scored against
    ``completion``/``answer``), ``exact_match``, ``unit_tests``, or ``module:function`` /
    ``file.py:function`` (``f(completion: str, row: dict) -> float``). A reward that raises or runs past
    ``reward_timeout_s`` counts as 0 and is reported."""

    group: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    iterations: int = 1
    clip_eps: float = 0.2
    beta: float = 0.04
    reward: str = "auto"
    reward_timeout_s: float = 10.0
    reference: str | None = None
    gen_batch: int = 0                   # rows per generate() call; 0 = the whole sample batch at once
    train: Literal["full", "lora", "esft"] = "full"

    @model_validator(mode="after")
    def _check(self):
        checks = [(self.group >= 2, f"grpo.group must be >= 2 (got {self.group}): advantages compare samples"),
                  (self.temperature > 0, f"grpo.temperature must be > 0 (got {self.temperature})"),
                  (0 < self.top_p <= 1, f"grpo.top_p must be in (0, 1] (got {self.top_p})"),
                  (self.max_new_tokens >= 1, f"grpo.max_new_tokens must be >= 1 (got {self.max_new_tokens})"),
                  (self.iterations >= 1, f"grpo.iterations must be >= 1 (got {self.iterations})"),
                  (self.clip_eps > 0, f"grpo.clip_eps must be > 0 (got {self.clip_eps})"),
                  (self.beta >= 0, f"grpo.beta must be >= 0 (got {self.beta})"),
                  (self.reward_timeout_s > 0, f"grpo.reward_timeout_s must be > 0 (got {self.reward_timeout_s})"),
                  (self.gen_batch >= 0, f"grpo.gen_batch must be >= 0 (got {self.gen_batch})")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    finetune: FinetuneSection
    data: SFTDataConfig
    train: FinetuneTrainConfig
    balance: BalanceConfig = BalanceConfig(method="none")
    lora: LoraSettings = LoraSettings()
    plora: PLoraSettings = PLoraSettings()
    esft: EsftSection = EsftSection()
    dpo: DPOSettings = DPOSettings()
    grpo: GRPOSettings = GRPOSettings()
    #: how to compute: kernels and attention path of the loaded base model, and train.compile
    runtime: RuntimeSettings = RuntimeSettings()
    parallel: ParallelConfig = ParallelConfig()    # torchrun jobs: dp × ep (full, lora with ep = 1, esft)

    @property
    def method(self) -> str:
        return self.finetune.method or "full"

    @property
    def trains(self) -> str:
        """What learns: the method, or for dpo / grpo their ``train`` setting (full, lora, esft)."""
        m = self.method
        return self.dpo.train if m == "dpo" else self.grpo.train if m == "grpo" else m

    @model_validator(mode="after")
    def _apply_runtime(self):
        if self.runtime.compile is not None:
            if "compile" in self.train.model_fields_set and self.train.compile != self.runtime.compile:
                raise ValueError(f"runtime.compile = {self.runtime.compile!r} contradicts train.compile = "
                                 f"{self.train.compile!r}; set it in one place ([runtime])")
            self.train.compile = self.runtime.compile
        return self

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data):
        # [lora] and [plora] are defined elsewhere and accept nan / inf; refuse them here by key
        if isinstance(data, dict):
            bad = non_finite_settings({k: data[k] for k in ("lora", "plora") if k in data})
            if bad:
                raise ValueError("; ".join(bad))
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.trains == "esft" and not self.esft.expert_config:
            raise ValueError("method esft needs esft.expert_config: the JSON written by `moelab esft select`")
        if self.method == "grpo" and self.train.batch_size % self.grpo.group:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be a multiple of grpo.group "
                             f"({self.grpo.group}): each micro-batch holds whole groups of samples")
        return self


def load_finetune_config(path: str | Path | None, overrides: list[str] = (), method: str | None = None,
                         base: str | None = None) -> FinetuneConfig:
    """Read a fine-tuning TOML (or none: everything from ``--set``), apply overrides and the method."""
    data = read_toml(path, SECTIONS, require_model=False) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    where = str(path) if path is not None else "--set"
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown fine-tuning method {method!r}; use one of {', '.join(METHODS)}")
        data.setdefault("finetune", {})["method"] = method
    if base is not None:
        data.setdefault("finetune", {})["base"] = base
    m = data.get("finetune", {}).get("method") or "full"
    for name in ("finetune", "data", "train"):
        if name not in data:
            hint = {"finetune": "base = 'runs/demo/model' (or --base)",
                    "data": "path = 'train.jsonl'", "train": "steps = 100"}[name]
            raise ConfigError(f"{where} has no [{name}] section; add one with at least {hint}")
    data["train"].setdefault("lr", DEFAULT_LR.get(m, 1e-4))
    try:
        return FinetuneConfig(**data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where, FinetuneConfig)) from None


__all__ = ["DEFAULT_LR", "METHODS", "DPOSettings", "EsftSection", "GRPOSettings", "FinetuneConfig", "FinetuneSection",
           "FinetuneTrainConfig", "SFTDataConfig", "load_finetune_config"]
