"""What the training loop trains: a :class:`Job` — a model, its data, its record, and hooks.

:func:`moelab.train.loop.fit` runs any job the same way (steps, evaluation, logging, checkpoints,
resume, report). Pre-training uses this class as it is; each fine-tuning method is a subclass that
overrides the hooks it needs (:mod:`moelab.tune.run`):

=====================  ==========================================  ==================================
hook                   default (pre-training, full fine-tuning)    overridden by
=====================  ==========================================  ==================================
``save_weights``       a Hugging Face checkpoint in ``CKPT/model`` LoRA, PeriodicLoRA, ESFT (all state)
``load_weights``       read ``CKPT/model`` back                    LoRA, PeriodicLoRA, ESFT
``schedule_step``      the optimizer step                          PeriodicLoRA (restarts each stage)
``after_step``         nothing                                     PeriodicLoRA (merges each stage)
``state_dict``         ``{}``                                      PeriodicLoRA (its stage counter)
``finalize``           copy the last checkpoint's model to         full (save), LoRA (adapter), ESFT
                       ``RUN_DIR/model``
``prepare_parallel``   nothing (a torchrun job, before the model   LoRA (checks), PeriodicLoRA
                       is split)                                   (refused), ESFT (row masks)
``finalize_sharded``   consolidate the last sharded checkpoint     LoRA (adapter), ESFT
                       into ``RUN_DIR/model``
=====================  ==========================================  ==================================
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelab.common.atomic import CHECKPOINT, OutputKind, write_dir
from moelab.dist.checkpoint import export
from moelab.dist.mesh import ParallelState
from moelab.interop.checkpoint import load_state_into, save, weight_files


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    status: str                 # "finished" | "interrupted"
    last_eval: dict
    checkpoint: Path | None


@dataclass
class Job:
    """A model with its data (``.batch()``, ``.eval_batches()``, ``.bytes_per_token``: a TokenData or an
    SFTData), the JSON record of its settings, and the hooks of the table above.

    ``extra_evals`` are more validation sets (e.g. ``"general"`` text, to measure forgetting), logged as
    ``{name}_val_loss`` etc.; ``kind`` labels the progress bar.
    """

    model: torch.nn.Module
    train_data: object
    val_data: object
    config_json: str
    tokenizer_file: Path | None = None
    extra_evals: dict = field(default_factory=dict)
    kind: str = "train"
    #: what RUN_DIR/model is (an LM checkpoint; a VL job's holds its processor settings too)
    final_kind: OutputKind = CHECKPOINT

    def save_weights(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        tok = self.tokenizer_file
        save(model, ckpt_dir / "model", tokenizer=tok if tok is not None and tok.is_file() else None)

    def load_weights(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_state_into(model, weight_files(ckpt_dir / "model"))

    def schedule_step(self, step: int) -> int:
        return step

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def state_dict(self) -> dict:
        """The job's own small state (ints, floats), carried through checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finalize(self, model: torch.nn.Module, run_dir: Path, last_ckpt: Path | None) -> None:
        """Write the final result: here the last checkpoint's model, where users look for it."""
        if last_ckpt is None:
            return
        src = last_ckpt / "model"
        write_dir(run_dir / "model", lambda tmp: [shutil.copy2(f, tmp / f.name) for f in src.iterdir()],
                  kind=self.final_kind, overwrite=True)

    def prepare_parallel(self, model: torch.nn.Module, ps: ParallelState) -> dict[str, torch.Tensor]:
        """Before a torchrun job splits ``model``: adapt it (or refuse, with an error every rank raises
        alike); returns row masks ``{parameter name: bool [E]}`` (:mod:`moelab.train.frozen_rows`)."""
        return {}

    def finalize_sharded(self, ckpt: Path, run_dir: Path) -> None:
        """The final result of a torchrun job from its last (sharded) checkpoint, on rank 0."""
        export(ckpt, run_dir / "model")
