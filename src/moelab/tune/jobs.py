"""The fine-tuning methods as :class:`~moelab.train.job.Job` subclasses: what each trains is set up by
:func:`moelab.tune.run.build_job`; here is only what each does differently in the one training loop.

=========  ============================================  ==============================================
job        checkpoints hold                              final result (RUN_DIR/...)
=========  ============================================  ==============================================
FullJob    the model (Hugging Face checkpoint)            ``model/``
LoraJob    every in-memory tensor (``state.safetensors``)  ``adapter/`` (PEFT format)
PLoraJob   every in-memory tensor + the stage counter    ``model/`` (LoRA merged into the weights)
EsftJob    every in-memory tensor                        ``esft/`` (expert_cfg.json + trained experts)
=========  ============================================  ==============================================

The parameter-efficient methods checkpoint the whole in-memory state (LoRA / ESFT tensors included) so
that ``--resume`` continues exactly; only their final result is small.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelab.dist.checkpoint import gather_full_model, load_model_state
from moelab.dist.coord import agreed
from moelab.dist.mesh import ParallelState
from moelab.errors import CheckpointError, ConfigError
from moelab.interop.checkpoint import save as save_model
from moelab.train.job import Job


def _save_state(model, ckpt_dir: Path) -> None:
    """Every tensor of the in-memory model (LoRA / ESFT ones included) into ``state.safetensors``."""
    state, seen = {}, {}
    for k, v in model.state_dict().items():
        v = v.detach()
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        state[k] = v.clone() if key in seen else v.contiguous()   # safetensors refuses shared storage
        if key is not None:
            seen[key] = k
    save_file(state, str(ckpt_dir / "state.safetensors"), metadata={"format": "pt"})


def _load_state(model, ckpt_dir: Path) -> None:
    path = ckpt_dir / "state.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no state.safetensors; it was not written by `moelab finetune`")
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match this fine-tuning setup (same method, LoRA and ESFT "
                              f"settings?): {str(e).splitlines()[0]}") from None


@dataclass
class FullJob(Job):
    def finalize(self, model: torch.nn.Module, run_dir: Path, last_ckpt: Path | None) -> None:
        save_model(model, run_dir / "model", tokenizer=self.tokenizer_file)


@dataclass
class _AllStateJob(Job):
    """Checkpoints hold every tensor of the in-memory model (``state.safetensors``)."""

    def save_weights(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        _save_state(model, ckpt_dir)

    def load_weights(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        _load_state(model, ckpt_dir)


@dataclass
class LoraJob(_AllStateJob):
    base: str = ""
    settings: object = None          # moelab.tune.lora.LoraSettings

    def finalize(self, model: torch.nn.Module, run_dir: Path, last_ckpt: Path | None) -> None:
        from moelab.tune.lora import save_adapter

        save_adapter(model, run_dir / "adapter", self.base, self.settings)

    def prepare_parallel(self, model: torch.nn.Module, ps: ParallelState) -> dict:
        from moelab.tune.lora import LoraExperts

        if ps.data_parallel == "fsdp":
            raise agreed(ConfigError(
                "LoRA does not run under FSDP2 (its adapted weights are computed properties FSDP cannot shard); "
                "set parallel.data_parallel = 'ddp' (the default for lora: the adapters are small, the frozen "
                "base is replicated)"))
        if ps.ep > 1 and any(isinstance(m, LoraExperts) for m in model.modules()):
            raise agreed(ConfigError(
                "LoRA adapters on routed experts cannot be split over expert-parallel ranks (an adapter's B "
                "columns interleave the experts); set parallel.ep = 1 (data parallelism), or leave the routed "
                "experts out of lora.target_modules"))
        return {}

    def finalize_sharded(self, ckpt: Path, run_dir: Path) -> None:
        """The adapter of a torchrun job: the base model with LoRA applied, the trained tensors loaded."""
        from moelab.interop.checkpoint import load as load_checkpoint_dir
        from moelab.tune.lora import apply_lora, save_adapter

        model = load_checkpoint_dir(self.base, dtype=torch.float32)
        apply_lora(model, self.settings)
        load_model_state(ckpt, model)
        save_adapter(model, run_dir / "adapter", self.base, self.settings)


@dataclass
class PLoraJob(_AllStateJob):
    plora: object = None             # moelab.tune.plora.PeriodicLoRA: merges and restarts each stage

    def schedule_step(self, step: int) -> int:
        return self.plora.schedule_step(step)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.plora.after_step(step, optimizer)

    def state_dict(self) -> dict:
        return self.plora.state_dict()

    def prepare_parallel(self, model: torch.nn.Module, ps: ParallelState) -> dict:
        raise agreed(ConfigError(
            "finetune plora does not run under torchrun: its stage merges rewrite weights that torchrun shards "
            "over ranks. Run it in one process, or use `moelab finetune lora` (which runs under torchrun)"))

    def load_state_dict(self, state: dict) -> None:
        self.plora.load_state_dict(state)

    def finalize(self, model: torch.nn.Module, run_dir: Path, last_ckpt: Path | None) -> None:
        from moelab.tune.lora import merge_lora

        merge_lora(model)
        save_model(model, run_dir / "model", tokenizer=self.tokenizer_file)


@dataclass
class EsftJob(_AllStateJob):
    expert_cfg: dict = field(default_factory=dict)

    def finalize(self, model: torch.nn.Module, run_dir: Path, last_ckpt: Path | None) -> None:
        from moelab.tune.esft import save_esft

        save_esft(model, self.expert_cfg, run_dir / "esft")
        shutil.copy2(self.tokenizer_file, run_dir / "esft" / "tokenizer.json")

    def prepare_parallel(self, model: torch.nn.Module, ps: ParallelState) -> dict:
        """Whole stacked expert tensors with row masks: the selected experts train wherever they live."""
        from moelab.tune.esft.training import esft_row_masks

        return esft_row_masks(model)

    def finalize_sharded(self, ckpt: Path, run_dir: Path) -> None:
        self.finalize(gather_full_model(ckpt), run_dir, ckpt)
