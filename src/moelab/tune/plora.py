"""PeriodicLoRA (arXiv 2402.16141; docs/methods.md §6): LoRA trained in stages, unloaded into the backbone.

Training updates only the LoRA factors (A ``[r, in]`` / ``[r·E, in]``, B ``[out, r]`` / ``[out, r·E]``
for a weight ``[out, in]`` / stacked experts ``[E, out, in]``, see :mod:`moelab.tune.lora`). Every
``stage_steps`` optimizer steps a stage ends and the adapter is *unloaded* into the base weights, so after
k stages the accumulated update ``W_k − W_0`` can reach rank ``k·r`` while memory stays that of rank-r
LoRA (the same LoRA tensors are reused; their count never changes).

Unloading (``plora.unload``):

* ``merge_reinit`` (default): at each stage end ``W += s·BA``, A redrawn (Kaiming-uniform), B zeroed:
  exactly function-preserving (up to rounding).
* ``momentum`` [UNCERTAIN]: the rule of a third-party implementation, applied after *every* step with
  m = ``plora.momentum``: ``W += m·s·BA; A *= 1−m; B *= 1−m``. It is not function-preserving: the output
  moves by ``−m(1−m)·s·BA`` each step. The optimizer state is kept, as in that implementation.

[UNCERTAIN] Reset scope: the paper's abstract does not say whether a stage end also resets the Adam
moments and the learning-rate schedule (secondary summaries say yes). Defaults: ``reset_optimizer = true``
(the LoRA parameters' optimizer state is dropped at each ``merge_reinit`` stage end, so Adam starts from
zero moments and a fresh bias correction) and ``lr_schedule = "restart"`` (the schedule, warm-up included,
restarts every stage; ``"continue"`` runs it over the whole run).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from moelab.errors import CheckpointError, ConfigError
from moelab.tune.lora import lora_modules, lora_parameters, merge_and_reinit


class PLoraSettings(BaseModel):
    """The ``[plora]`` section.

    ``stage_steps``: optimizer steps per stage. ``unload``: ``merge_reinit`` (default, function-preserving)
    or ``momentum`` [UNCERTAIN: a third-party rule, see the module docstring]. ``momentum``: m of that rule.
    ``reset_optimizer`` [UNCERTAIN scope]: drop the LoRA tensors' optimizer state at each ``merge_reinit``
    stage end (momentum unloading keeps it). ``lr_schedule`` [UNCERTAIN]: ``restart`` the LR schedule every
    stage (default) or ``continue`` it over the run.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    stage_steps: int = 100
    unload: Literal["merge_reinit", "momentum"] = "merge_reinit"
    momentum: float = 0.1
    reset_optimizer: bool = True
    lr_schedule: Literal["restart", "continue"] = "restart"

    @model_validator(mode="after")
    def _check(self):
        if self.stage_steps < 1:
            raise ValueError(f"plora.stage_steps must be >= 1 (got {self.stage_steps})")
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"plora.momentum must be in (0, 1) (got {self.momentum})")
        return self


@torch.no_grad()
def momentum_unload(model: nn.Module, m: float) -> None:
    """The third-party momentum rule [UNCERTAIN]: ``W += m·s·BA; A *= 1−m; B *= 1−m`` for every adapter.

    Not function-preserving: ``W + s·BA`` becomes ``W + s·BA − m(1−m)·s·BA``.
    """
    for _, mod in lora_modules(model):
        for name in mod.lora_slots:
            W = mod._parameters[name]
            delta = mod._lora_delta(name)
            dt = torch.promote_types(torch.promote_types(W.dtype, delta.dtype), torch.float32)
            W.copy_((W.to(dt) + m * delta.to(dt)).to(W.dtype))
            mod.lora_A[name].mul_(1.0 - m)
            mod.lora_B[name].mul_(1.0 - m)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Drop the optimizer state (Adam moments, step count) of ``params``; it is re-created from zero at the
    next ``optimizer.step()``, exactly as for a fresh optimizer."""
    for p in params:
        optimizer.state.pop(p, None)


class PeriodicLoRA:
    """Stage bookkeeping for PeriodicLoRA on a model that :func:`~moelab.tune.lora.apply_lora` adapted.

    Call ``after_step(step, optimizer)`` after every ``optimizer.step()`` with the number of completed
    steps, and feed ``schedule_step(step)`` (step = steps completed before the update) to the LR schedule.
    ``state_dict()`` / ``load_state_dict()`` carry the stage count across a resume.
    """

    def __init__(self, model: nn.Module, settings: PLoraSettings):
        if not isinstance(settings, PLoraSettings):
            raise ConfigError(f"PeriodicLoRA wants PLoraSettings, got {type(settings).__name__}")
        self.params = lora_parameters(model)
        if not self.params:
            raise ConfigError("PeriodicLoRA needs a model with LoRA adapters; call apply_lora(model, ...) first")
        self.model = model
        self.settings = settings
        self.stages_done = 0
        self.last_step = 0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Unload as configured after optimizer step number ``step`` (1-based); True at a stage end."""
        s = self.settings
        self.last_step = int(step)
        if s.unload == "momentum":
            momentum_unload(self.model, s.momentum)
        if step <= 0 or step % s.stage_steps:
            return False
        if s.unload == "merge_reinit":
            merge_and_reinit(self.model)
            if s.reset_optimizer and optimizer is not None:
                reset_optimizer_state(optimizer, self.params)
        self.stages_done += 1
        return True

    def schedule_step(self, step: int) -> int:
        """The step to give the LR schedule before optimizer step ``step + 1``: the step within the current
        stage (``lr_schedule = "restart"``) or ``step`` itself (``"continue"``)."""
        if self.settings.lr_schedule == "continue":
            return int(step)
        return int(step) % self.settings.stage_steps

    @property
    def trainable_count(self) -> int:
        """Number of trainable LoRA values (constant across stages)."""
        return sum(p.numel() for p in self.params)

    def state_dict(self) -> dict[str, int]:
        return {"stages_done": self.stages_done, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return  # a checkpoint written before the first stage bookkeeping: start from zero
        try:
            self.stages_done = int(state["stages_done"])
            self.last_step = int(state.get("last_step", 0))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"PeriodicLoRA state {state!r} is not valid; expected "
                                  "{'stages_done': int, 'last_step': int}") from None


__all__ = ["PLoraSettings", "PeriodicLoRA", "momentum_unload", "reset_optimizer_state"]
