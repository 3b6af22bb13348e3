"""Typed configuration of a pre-training run: the ``[data]``, ``[train]`` and ``[balance]`` sections
of a TOML file (the ``[model]`` section is :class:`moelab.config.ModelConfig`).

    moelab train configs/tiny.toml --set train.steps=100 --set balance.method=aux_loss
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moelab.config import CompileScope, ModelConfig, RuntimeSettings, format_validation_error, read_toml
from moelab.dist.mesh import ParallelConfig
from moelab.errors import ConfigError


class _Section(BaseModel):
    # allow_inf_nan=False: every float setting must be finite (`--set train.lr=nan` is refused by name)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MixtureSource(_Section):
    """One source of ``[data.mixture.NAME]``: a token directory and its share of the training rows."""

    path: str
    weight: float


class DataConfig(_Section):
    """Where the tokens come from (a directory written by ``moelab data prepare``), or a weighted mixture
    of such directories prepared with one tokenizer (:mod:`moelab.data.tokens.mixture`)::

        [data.mixture.code]                 # e.g. DeepSeek-Coder-V2: 60% code, 10% math, 30% text
        path = "runs/data/code"
        weight = 0.6

    With a mixture, ``path`` is not used: validation runs on the first source, and every other source's
    validation split is logged as ``{name}_val_loss`` / ``_ppl`` / ``_bpb``."""

    path: str = "runs/data/shakespeare"
    seq_len: int = 256
    mixture: dict[str, MixtureSource] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2 (got {self.seq_len})")
        if self.mixture is not None:
            if not self.mixture:
                raise ValueError("data.mixture is empty; give at least one [data.mixture.NAME] with path and weight")
            bad = {k: m.weight for k, m in self.mixture.items() if not m.weight >= 0}
            if bad or sum(m.weight for m in self.mixture.values()) <= 0:
                raise ValueError(f"data.mixture weights must be >= 0 and not all 0 (got "
                                 f"{ {k: m.weight for k, m in self.mixture.items()} })")
        return self


class RecordDataConfig(_Section):
    """``[data]`` of the stages that read records from JSON Lines (SFT, DPO, GRPO, VL): the file, its
    validation split (``val_path``, else a seeded ``val_fraction``), the row length, packing, and whether a
    malformed line stops the run or is skipped and counted."""

    path: str
    val_path: str | None = None                 # a separate validation file; else a val_fraction split
    val_fraction: float = 0.05
    seq_len: int = 512
    packing: bool = True
    skip_malformed: bool = False                # skip and count malformed lines instead of stopping

    @model_validator(mode="after")
    def _check(self):
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2 (got {self.seq_len})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1) (got {self.val_fraction})")
        return self


class TrainConfig(_Section):
    """The optimisation recipe (defaults: DeepSeek LLM / DeepSeekMoE, docs/methods.md §1 and §10)."""

    steps: int | None = None            # optimizer steps; or give `tokens`
    tokens: int | None = None           # token budget -> steps = tokens // (batch_size·grad_accum·seq_len)
    batch_size: int = 16                # sequences per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 1e-3                    # peak learning rate
    lr_schedule: Literal["multistep", "cosine", "wsd", "constant"] = "multistep"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1           # cosine / wsd floor
    milestones: tuple[float, float] = (0.8, 0.9)
    gamma: float = 0.316
    decay_fraction: float = 0.2         # wsd
    weight_decay: float = 0.1           # not on norms, biases or the routing bias
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 = off
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"   # compute (autocast) dtype; float16 is refused
    weights_dtype: Literal["float32", "bfloat16"] = "float32"     # master weights: fp32 (mixed precision, the
                                        # default) or pure bf16 (half the memory; AdamW updates in bf16)
    device: str = "auto"                # auto (the GPU when there is one) | cpu | cuda | cuda:N
    activation_checkpointing: bool = False   # recompute each block in backward: ~1/3 more compute, activations
                                        # of one block instead of all (moelab.train.checkpointing)
    seed: int = 0
    threads: int | None = None          # torch intra-op threads (None or 0: torch's default)
    keep_host_memory: bool = True       # CPU: glibc keeps freed blocks for reuse (no per-step page faults;
                                        # RSS stays near its peak) — moelab.train.host_memory
    compile: CompileScope = False       # torch.compile whole decoder blocks (true or "blocks") or only their
                                        # dense parts ("dense") — moelab.train.compile
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 16
    ckpt_every: int = 500
    keep_last: int = 2
    init_from: str | None = None        # start from a checkpoint directory instead of random weights

    @model_validator(mode="after")
    def _check(self):
        p = []
        if (self.steps is None) == (self.tokens is None):
            p.append("give exactly one of train.steps and train.tokens")
        for name in ("batch_size", "grad_accum", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            p.append("train.steps / train.tokens must be positive")
        if self.lr <= 0:
            p.append(f"train.lr must be positive (got {self.lr})")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            p.append("train.warmup_steps, grad_clip and weight_decay must not be negative")
        if self.dtype == "float16":
            p.append("train.dtype = 'float16' is not supported: fp16 training needs a gradient scaler, which moelab "
                     "does not have; use 'bfloat16' (the same tensor-core speed on GPUs since Ampere) or 'float32'")
        if self.weights_dtype == "bfloat16" and self.dtype != "bfloat16":
            p.append(f"train.weights_dtype = 'bfloat16' computes in bfloat16; set train.dtype = 'bfloat16' "
                     f"(got {self.dtype!r}), or keep float32 weights")
        if self.threads is not None and self.threads < 0:
            p.append(f"train.threads must be >= 0 (got {self.threads}); 0 or unset uses PyTorch's default")
        if self.seed < 0:
            p.append(f"train.seed must be >= 0 (got {self.seed})")
        if p:
            raise ValueError("; ".join(p))
        return self

    def total_steps(self, seq_len: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, self.tokens // (self.batch_size * self.grad_accum * seq_len))


class BalanceConfig(_Section):
    """Expert load balancing (docs/methods.md §3).

    * ``loss_free``: a per-expert bias, added to the scores for top-k selection only, moves by
      ``bias_update_rate·sign(mean load − load_i)`` once per optimizer step from that step's loads.
      Needs a router with the bias (``topk_method = "noaux_tc"``; ``n_group = 1`` for plain top-k).
    * ``aux_loss``: the expert-level balance loss ``α·Σ f_i·P_i`` (``aux_kind = "sequence"`` for the
      DeepSeek-V3 sequence-wise variant), optionally a device-level term.
    * ``none``: no balancing.

    ``seq_aux_alpha`` adds the sequence-wise loss on top of any method (DeepSeek-V3: loss_free + 1e-4).
    """

    method: Literal["loss_free", "aux_loss", "none"] = "loss_free"
    bias_update_rate: float = 1e-3
    bias_update_rule: Literal["sign", "linear"] = "sign"
    #: [UNCERTAIN] torchtitan re-centres the bias after each update; the paper and Megatron do not.
    bias_recenter: bool = False
    freeze_after_tokens: int | None = None
    aux_alpha: float = 1e-3
    aux_kind: Literal["expert", "sequence"] = "expert"
    device_alpha: float = 0.0
    n_devices: int = 1
    seq_aux_alpha: float = 0.0
    #: [UNCERTAIN] V3 prints the indicator as top-K of the unbiased scores; implementations use the
    #: actual routing map ("routed").
    seq_aux_indicator: Literal["unbiased_topk", "routed"] = "unbiased_topk"

    @model_validator(mode="after")
    def _check(self):
        if self.bias_update_rate < 0 or self.aux_alpha < 0 or self.device_alpha < 0 or self.seq_aux_alpha < 0:
            raise ValueError("balance rates and coefficients must not be negative")
        if self.n_devices < 1:
            raise ValueError(f"balance.n_devices must be >= 1 (got {self.n_devices})")
        return self


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig
    balance: BalanceConfig = BalanceConfig()
    runtime: RuntimeSettings = RuntimeSettings()
    parallel: ParallelConfig = ParallelConfig()    # torchrun jobs: dp × ep (moelab.dist.mesh)

    @model_validator(mode="after")
    def _apply_runtime(self):
        """``[runtime]`` sets the model's runtime fields and ``train.compile`` (one place for all of them)."""
        targets = {k: ("model", self.model) for k in self.runtime.model_settings()}
        if self.runtime.compile is not None:
            targets["compile"] = ("train", self.train)
        for key, (section, obj) in targets.items():
            value = getattr(self.runtime, key)
            if key in obj.model_fields_set and getattr(obj, key) != value:
                raise ValueError(f"runtime.{key} = {value!r} contradicts {section}.{key} = {getattr(obj, key)!r}; "
                                 f"set it in one place ([runtime])")
            setattr(obj, key, value)
        return self


def _coerce(text: str) -> Any:
    """Read a --set value as TOML (numbers, booleans, strings, arrays); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (``--set``) to a parsed TOML dict."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set expects section.key=value (got {item!r}), e.g. --set train.steps=100")
        dotted, value = item.split("=", 1)
        *sections, key = dotted.strip().split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {s} is not a section")
        node[key] = _coerce(value.strip())
    return data


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run config. Without a [model] section the model is the one of ``train.init_from`` (continued
    pre-training: a context-extension stage, a code mixture on a trained model, ...)."""
    data = apply_overrides(read_toml(path, require_model=False), list(overrides))
    if "train" not in data:
        raise ConfigError(f"{path} has no [train] section; add one with at least `steps = N` or `tokens = N`")
    if "model" not in data:
        init_from = data["train"].get("init_from")
        if not init_from:
            raise ConfigError(f"{path} has no [model] section; describe the model there, or set train.init_from "
                              "to a checkpoint whose model to continue")
        from moelab.interop.hf_config import read_config_json

        data["model"] = read_config_json(Path(init_from)).model_dump()
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), RunConfig)) from None


__all__ = ["BalanceConfig", "DataConfig", "MixtureSource", "RunConfig", "TrainConfig", "apply_overrides",
           "load_run_config"]
