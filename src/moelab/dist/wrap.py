"""Make a model data- and expert-parallel, and the gradient arithmetic that goes with it.

    parallelize(model, ps)       # in place, before the optimizer is built
        ep > 1:   each MoE layer keeps its E/ep routed experts (:mod:`moelab.dist.expert_parallel`)
        fsdp:     fully_shard(experts, dp mesh) per MoE layer; fully_shard(block, world mesh) per block;
                  fully_shard(model, world mesh)  (parameters, gradients and AdamW state become DTensors)
        ddp:      replicate(model) (torch's DDP, composable: parameter names unchanged), the routed experts
                  left out of it when ep > 1 and all-reduced over the dp ranks by :func:`sync_expert_grads`

Every rank's loss is the mean over its own tokens, so the gradient of the global mean is the sum over
ranks divided by the world size W. Dense parameters: every rank holds a replica or shard → averaged over
W. Routed experts under EP: rank r's experts receive gradient from all ep ranks' tokens through the
all-to-all, so summing over the dp ranks that hold the same experts and dividing by W (not dp) gives the
global mean: FSDP and DDP average over the dp ranks, and :func:`sync_expert_grads` multiplies by dp/W = 1/ep
(exact for powers of two; FSDP2's own ``set_gradient_divide_factor`` needs PREMUL_SUM, which gloo lacks).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moelab.dist.mesh import ParallelState
from moelab.model.moe import DeepSeekMoE


def routed_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``experts`` module of every MoE layer."""
    return [m.experts for m in model.modules() if isinstance(m, DeepSeekMoE)]


def is_expert_param(name: str) -> bool:
    """Parameter names of routed experts (``...mlp.experts.gate_up_proj`` / ``down_proj``)."""
    return ".experts." in f".{name}" and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")


def parallelize(model: torch.nn.Module, ps: ParallelState) -> torch.nn.Module:
    """Shard experts over ep and wrap for data parallelism (in place; returns the model)."""
    if not ps.distributed:
        return model
    if ps.ep > 1:
        from moelab.dist.expert_parallel import shard_model_experts

        shard_model_experts(model, ps)
    if ps.data_parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for experts in routed_experts(model):
            fully_shard(experts, mesh=ps.dp_mesh, reshard_after_forward=True)
        for block in model.model.layers:
            fully_shard(block, mesh=ps.world_mesh, reshard_after_forward=True)
        fully_shard(model, mesh=ps.world_mesh, reshard_after_forward=True)
    else:
        from torch.distributed._composable import replicate

        ignored = routed_experts(model) if ps.ep > 1 else []
        left_out = {id(p) for m in ignored for p in m.parameters()}
        if any(p.requires_grad and id(p) not in left_out for p in model.parameters()):   # (ESFT: maybe none)
            replicate(model, ignored_modules=ignored, process_group=ps.world_mesh.get_group())
    return model


def sync_expert_grads(model: torch.nn.Module, ps: ParallelState) -> None:
    """After backward, with ep > 1: make each local expert's gradient the global mean's — the sum over
    the dp ranks holding it divided by W. FSDP has averaged over dp already (× 1/ep left to do); DDP left
    the experts out, so they are all-reduced over dp here and divided by W."""
    if not ps.distributed or ps.ep == 1:
        return
    grads = [_local(p.grad) for e in routed_experts(model) for p in e.parameters() if p.grad is not None]
    if not grads:
        return
    if ps.data_parallel == "fsdp":
        torch._foreach_mul_(grads, 1.0 / ps.ep)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if ps.dp > 1:
        dist.all_reduce(flat, group=ps.dp_mesh.get_group())
    flat /= ps.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float, ps: ParallelState) -> float:
    """The global gradient norm (clipped to ``max_norm`` when finite), counting every element once.

    DTensor gradients (FSDP2): each rank holds a distinct shard → local sums of squares added over all
    ranks. Plain gradients: replicated dense ones counted once; routed experts under EP (DDP) are distinct
    per ep rank → added over the ep group."""
    if not ps.distributed:
        params = [p for p in model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    sharded = torch.zeros((), dtype=torch.float64, device=ps.device)
    per_ep = torch.zeros_like(sharded)
    replicated = torch.zeros_like(sharded)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = _local(p.grad)
        grads.append(g)
        sq = g.detach().to(torch.float64).pow(2).sum()
        if isinstance(p.grad, DTensor):
            sharded += sq
        elif ps.ep > 1 and is_expert_param(name):
            per_ep += sq
        else:
            replicated += sq
    dist.all_reduce(sharded)
    if ps.ep > 1:
        dist.all_reduce(per_ep, group=ps.ep_group)
    norm = float((sharded + per_ep + replicated).sqrt())
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm


def all_mean(values: list[float], ps: ParallelState) -> list[float]:
    """The mean over ranks of a few floats (one collective)."""
    if not ps.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ps.device)
    dist.all_reduce(t)
    return (t / ps.world).tolist()


def all_sum(values: list[float], ps: ParallelState) -> list[float]:
    """The sum over ranks of a few floats (one collective)."""
    if not ps.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ps.device)
    dist.all_reduce(t)
    return t.tolist()
