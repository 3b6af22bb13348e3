"""Parameters of which only some rows train: ESFT's selected experts inside the stacked expert tensors of
a torchrun job, where experts are split over ranks and sharded by FSDP.

Legend: E routed experts, El = E/ep experts on this rank, n_local the rows of this rank's (FSDP) shard.

One process trains ESFT's selected experts as separate ``rows`` parameters (:mod:`moelab.tune.esft.training`).
Under torchrun every rank must hold parameters of the same names and global shapes (FSDP2, DDP and the
sharded checkpoints rely on it), so the stacked ``experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``
of a layer with selected experts stay whole, trainable, and carry a row mask ``[E]`` (True: a selected
expert). Each step:

    grad[~mask] = 0                          after backward (and the expert-gradient reduction), before
                                             the gradient norm: frozen experts add nothing to it
    p[mask] *= 1 - lr · weight_decay          AdamW's decoupled decay, on the selected rows only (the
                                             optimizer's own group for these tensors has weight_decay 0)

AdamW's moments of a frozen row stay zero, so its update is exactly zero: the frozen experts end the run
bit-identical to the base model, wherever they live — on any ep rank, in any FSDP shard (tested).
The optimizer keeps moments for the frozen rows too (ESFT's memory saving is a one-process feature).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from moelab.dist.mesh import ParallelState


class FrozenRows:
    """Row masks of stacked parameters, localised to this rank's slice and shard.

    ``masks``: ``{parameter name: bool [E]}`` over the full model's experts, built before the model is
    split; :meth:`attach` (after :func:`moelab.dist.wrap.parallelize`) finds each parameter and cuts its
    mask to the rows this rank holds."""

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self.masks = dict(masks or {})
        self.local: list[tuple[torch.nn.Parameter, torch.Tensor]] = []    # (parameter, float mask [n_local, 1, 1])
        self.weight_decay = 0.0

    def __bool__(self) -> bool:
        return bool(self.masks)

    def attach(self, model: torch.nn.Module, ps: ParallelState) -> FrozenRows:
        params = dict(model.named_parameters())
        missing = sorted(set(self.masks) - set(params))
        if missing:
            raise KeyError(f"row masks for parameters the model does not have: {missing[:3]}")
        for name, mask in self.masks.items():
            p = params[name]
            module = model.get_submodule(name.rsplit(".", 1)[0])
            first = getattr(module, "first", 0)                  # expert parallelism: rows [first, first + El)
            n_rows = p.shape[0]                                  # El (the DTensor's global shape under FSDP)
            m = mask[first:first + n_rows].to(device=ps.device, dtype=torch.float32)
            if isinstance(p, DTensor):                           # FSDP2: this rank's shard of the El rows
                m = distribute_tensor(m, p.device_mesh, p.placements).to_local()
            local = p.to_local() if isinstance(p, DTensor) else p
            self.local.append((p, m.to(local.dtype).view(-1, *([1] * (local.dim() - 1)))))
        return self

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p, _ in self.local]

    @torch.no_grad()
    def zero_frozen_grads(self) -> None:
        """Set the gradient of every frozen row to zero (call after backward, before the norm)."""
        for p, m in self.local:
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(m)

    @torch.no_grad()
    def decay(self, lr: float) -> None:
        """AdamW's decoupled weight decay on the trainable rows only (call before the optimizer step)."""
        if not self.weight_decay:
            return
        for p, m in self.local:
            w = p.to_local() if isinstance(p, DTensor) else p
            w.mul_(1 - lr * self.weight_decay * m)

    def install(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        """Decay the trainable rows before every ``optimizer.step()`` (the group's current LR)."""
        self.weight_decay = weight_decay
        if not self.local:
            return
        ids = {id(p) for p in self.params()}
        group = next(g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"]))
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.decay(group["lr"]))


__all__ = ["FrozenRows"]
