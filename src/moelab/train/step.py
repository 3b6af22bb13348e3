"""One optimizer step: micro-batches forward and backward, the gradient norm, the update.

    for each of grad_accum micro-batches [B, T]:
        loss = CE(model(x).logits [B, T, V], y [B, T]) + aux      (targets == -100 carry no loss)
        (loss / grad_accum).backward()
    norm = clip(grads, grad_clip)        # measured even when not clipping; non-finite: stop, no update
    AdamW step

A non-finite loss or gradient norm raises :class:`TrainingError` *before* the update, so the weights
(and every checkpoint written later) stay finite.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelab.dist.mesh import ParallelState
from moelab.dist.wrap import clip_grad_norm, sync_expert_grads
from moelab.errors import TrainingError
from moelab.lm.nll import IGNORE, lm_loss
from moelab.train.balance import Balancer
from moelab.train.config import TrainConfig
from moelab.train.frozen_rows import FrozenRows


@dataclass
class StepStats:
    loss: float          # mean LM loss over the micro-batches (or the data's own loss, e.g. DPO)
    aux_loss: float      # mean auxiliary (balancing) loss
    grad_norm: float     # total gradient norm before clipping
    extra: dict = field(default_factory=dict)   # the data's own metrics, mean over micro-batches


def param_groups(model: torch.nn.Module, weight_decay: float, row_masked: list | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear, embedding, expert weights), none on norms and
    biases. The routing bias is a buffer, so it is in no group at all. ``row_masked`` parameters
    (:mod:`moelab.train.frozen_rows`: decayed row by row outside the optimizer) get a group of their own."""
    masked = {id(p) for p in row_masked or []}
    decay, no_decay, rows = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (rows if id(p) in masked else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": rows, "weight_decay": 0.0}] if rows else [])


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, frozen_rows: FrozenRows | None = None
                    ) -> torch.optim.Optimizer:
    # fused: one multi-tensor kernel per step (CPU and CUDA); 7x faster than the per-parameter loop
    # for ~100M fp32 parameters on the CPU (benchmarks/train_step.py notes)
    masked = frozen_rows.params() if frozen_rows else []
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay, masked), lr=tc.lr, betas=tc.betas, eps=tc.eps,
                            fused=True)
    if frozen_rows:
        frozen_rows.install(opt, tc.weight_decay)
    return opt


def autocast_ctx(dtype: str, device: torch.device):
    """Mixed precision for ``train.dtype``: none for float32, else autocast to that dtype (weights stay
    fp32)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of floating-point parameters and buffers holding NaN or inf."""
    return [k for k, v in model.state_dict().items()
            if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def _diverged(what: str, value: float, step: int, last_ckpt: Path | None, advice: str) -> TrainingError:
    return TrainingError(f"{what} became {value} at step {step}; stopping before the update (the weights are "
                         f"unchanged). The last good checkpoint is {last_ckpt or '(none yet)'}. Try {advice}")


def _out_of_memory(model, tc: TrainConfig, shape, step: int, last_ckpt: Path | None) -> TrainingError:
    """The message for a device out of memory at ``step`` (the weights are not updated by that step)."""
    model.zero_grad(set_to_none=True)
    device = model.device
    used = ""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        used = f", {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB at the peak"
    advice = ["train.activation_checkpointing = true"] if not tc.activation_checkpointing else []
    advice.append(f"a smaller train.batch_size (with a larger train.grad_accum to keep {tc.batch_size * tc.grad_accum}"
                  " sequences per step)")
    return TrainingError(
        f"out of memory on {device} at step {step} with micro-batches of {shape[0]} × {shape[1]} tokens "
        f"(train.batch_size × data.seq_len{used}); the weights were not updated and the last checkpoint is "
        f"{last_ckpt or '(none yet)'}. Try {' or '.join(advice)}")


def rank_weight(y_mine: torch.Tensor, y_all: torch.Tensor, world: int) -> float:
    """The factor that turns this rank's mean loss into its share of the global batch's mean: W · n_mine /
    n_all (target tokens, != −100). Averaging the weighted losses (and gradients) over the W ranks then gives
    the mean over every target token of the global batch, as one process computes it — also when SFT
    prompts leave the ranks different numbers of targets. 1 for one process and for plain text."""
    if world == 1:
        return 1.0
    n_all = int((y_all != IGNORE).sum())
    return world * int((y_mine != IGNORE).sum()) / n_all if n_all else 1.0


def model_inputs(data, rows: dict, device: torch.device) -> dict:
    """The forward's inputs beyond the token ids that ``data`` owns (a vision-language batch's images):
    ``data.model_inputs(rows, device)`` where the data defines it, else none."""
    fn = getattr(data, "model_inputs", None)
    return fn(rows, device) if fn is not None and rows else {}


def train_step(model, data, balancer: Balancer, optimizer: torch.optim.Optimizer, tc: TrainConfig,
               seq_len: int, step: int, last_ckpt: Path | None = None, ps: ParallelState | None = None,
               frozen_rows: FrozenRows | None = None) -> StepStats:
    """Run optimizer step ``step + 1`` (batches are a pure function of seed, step and micro-batch).

    Under torchrun (``ps``) each rank trains on its rows of the same global micro-batch, so the batches do
    not depend on the world size; the returned losses are this rank's (the caller averages them)."""
    ps = ps or ParallelState.single(model.device)
    loss_sum, aux, extra = 0.0, 0.0, {}
    device = ps.device
    for micro in range(tc.grad_accum):
        batch = data.batch(tc.batch_size, seq_len, step, micro, tc.seed)
        own = isinstance(batch, dict)      # data with its own loss (DPO): {"x", "y", ...} and data.loss_fn
        if own:
            rows = {k: ps.my_rows(v) for k, v in batch.items()}
            x = rows["x"].to(device, non_blocking=True)
        else:
            x_all, y_all = batch
            x, y = ps.my_rows(x_all), ps.my_rows(y_all)
            weight = rank_weight(y, y_all, ps.world)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        try:
            with autocast_ctx(tc.dtype, device):
                logits = model(x, **model_inputs(data, rows if own else {}, device)).logits
            if own:          # every rank holds as many pairs: the mean over ranks is the global mean
                loss, metrics = data.loss_fn(logits, rows)
                for k, v in metrics.items():
                    extra[k] = extra.get(k, 0.0) + v / tc.grad_accum
            else:
                loss = lm_loss(logits, y) * weight if weight != 1.0 else lm_loss(logits, y)
            del logits
            aux_t = balancer.pop_aux_loss()
            total = loss if aux_t is None else loss + aux_t
            if not torch.isfinite(total.detach()):
                raise _diverged("the loss", float(total.detach()), step + 1, last_ckpt,
                                "a lower train.lr, train.dtype = 'float32', or a smaller train.grad_clip")
            (total / tc.grad_accum).backward()
        except torch.OutOfMemoryError:
            raise _out_of_memory(model, tc, x.shape, step + 1, last_ckpt) from None
        loss_sum += float(loss.detach()) / tc.grad_accum
        aux += (float(aux_t.detach()) if aux_t is not None else 0.0) / tc.grad_accum
    sync_expert_grads(model, ps)
    if frozen_rows:
        frozen_rows.zero_frozen_grads()
    # max_norm=inf measures without clipping (the norm is checked, and logged, either way)
    grad_norm = clip_grad_norm(model, tc.grad_clip if tc.grad_clip > 0 else math.inf, ps)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise _diverged("the gradient norm", grad_norm, step + 1, last_ckpt,
                        "a lower train.lr, more train.warmup_steps, or train.dtype = 'float32'")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_sum, aux, grad_norm, extra)
