"""The ``[parallel]`` section and the process layout of a torchrun job: dp × ep ranks on a 2-D device mesh.

    torchrun --nproc_per_node=4 -m moelab train configs/tiny.toml      # [parallel] dp = 2, ep = 2

Ranks are laid out ``rank = dp_rank · ep + ep_rank`` (ep innermost, so an expert-parallel group is a
run of consecutive ranks: one node when ep ≤ GPUs per node). Every rank reads its own rows of each batch
(all dp · ep ranks are data-parallel for the dense parts); routed experts are split over the ``ep`` ranks
of a group, and each expert's gradient is reduced over the ``dp`` ranks holding the same experts.

Without torchrun (no ``WORLD_SIZE`` in the environment) a job is one process and nothing here touches
``torch.distributed``: :meth:`ParallelState.single`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, model_validator

from moelab.errors import ConfigError


class ParallelConfig(BaseModel):
    """``[parallel]``: how a torchrun job splits its work. ``dp · ep`` must equal the world size."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    dp: int | None = None                 # data-parallel degree (default: world size / ep)
    ep: int = 1                           # expert-parallel degree: routed experts split over this many ranks
    data_parallel: Literal["auto", "fsdp", "ddp"] = "auto"   # FSDP2 fully_shard (sharded weights, grads and
                                          # AdamW state) or DDP (replicas, all-reduced gradients); auto: FSDP2,
                                          # except DDP for LoRA fine-tuning
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on the CPU
    timeout_s: float = 300.0              # a collective waiting longer (a lost or stuck rank) ends the job

    @model_validator(mode="after")
    def _check(self):
        if self.ep < 1 or (self.dp is not None and self.dp < 1):
            raise ValueError(f"parallel.dp and parallel.ep must be >= 1 (got dp={self.dp}, ep={self.ep})")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0 (got {self.timeout_s})")
        return self


def launched_world() -> int:
    """The world size torchrun set (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ParallelState:
    """Where this process sits: ranks, degrees, device meshes and process groups (None for one process).

    ``mesh`` is the (dp, ep) mesh; ``world_mesh`` its flattening (the dense parts' FSDP mesh);
    ``dp_mesh`` the ranks that hold this rank's experts; ``ep_group`` the ranks that exchange tokens."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    dp: int = 1
    ep: int = 1
    data_parallel: str = "fsdp"
    device: torch.device = torch.device("cpu")
    mesh: object = None
    world_mesh: object = None
    dp_mesh: object = None
    ep_group: object = None

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelState:
        return cls(device=torch.device(device))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch ``[B, ...]``: the rank-th of ``world`` near-equal runs
        (``torch.tensor_split``; training batches divide evenly, a short last evaluation batch may not)."""
        return t.tensor_split(self.world)[self.rank] if self.distributed else t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def check_layout(pc: ParallelConfig, world: int, n_experts: int, batch_size: int | None = None) -> tuple[int, int]:
    """(dp, ep) for ``world`` ranks, or a :class:`ConfigError` saying what to change."""
    ep = pc.ep
    dp = pc.dp if pc.dp is not None else world // ep
    if dp * ep != world:
        raise ConfigError(f"[parallel] dp = {pc.dp if pc.dp is not None else '(inferred)'} × ep = {ep} does not "
                          f"make the {world} ranks torchrun started; set dp · ep = {world} (or leave dp out and "
                          f"choose an ep that divides {world})")
    if n_experts == 0 and ep > 1:
        raise ConfigError("parallel.ep > 1 needs routed experts, and this model has none; set parallel.ep = 1")
    if ep > 1 and ep > n_experts:
        raise ConfigError(f"parallel.ep = {ep} is more ranks than the {n_experts} routed experts; use at most "
                          f"{n_experts} (each rank must hold at least one expert)")
    if ep > 1 and n_experts % ep:
        raise ConfigError(f"parallel.ep = {ep} does not divide the {n_experts} routed experts; choose one of "
                          f"{[d for d in range(1, n_experts + 1) if n_experts % d == 0 and world % d == 0]}")
    if batch_size is not None and batch_size % world:
        raise ConfigError(f"train.batch_size = {batch_size} sequences cannot be split over {world} ranks; make "
                          f"it a multiple of {world} (each rank reads batch_size / world rows of every batch)")
    return dp, ep


def init_parallel(pc: ParallelConfig, device: torch.device, n_experts: int,
                  batch_size: int | None = None) -> ParallelState:
    """Join torchrun's process group and build the meshes (or the one-process state without torchrun).

    Every rank checks the layout before any collective, so a bad ``[parallel]`` section fails the same way
    on all of them and nothing waits for a peer that has already left."""
    world = launched_world()
    try:
        dp, ep = check_layout(pc, world, n_experts, batch_size)
    except ConfigError as e:     # every rank finds the same: rank 0 says it (moelab.cli_utils.friendly)
        e.agreed = True
        raise
    data_parallel = "fsdp" if pc.data_parallel == "auto" else pc.data_parallel
    if world == 1:
        return ParallelState(data_parallel=data_parallel, device=torch.device(device))
    from torch.distributed.device_mesh import init_device_mesh

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = pc.backend if pc.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=pc.timeout_s),
                                device_id=device if backend == "nccl" else None)
    mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    return ParallelState(world=world, rank=rank, local_rank=local_rank, dp=dp, ep=ep,
                         data_parallel=data_parallel, device=device, mesh=mesh,
                         world_mesh=mesh._flatten("world"), dp_mesh=mesh["dp"], ep_group=mesh["ep"].get_group())


def close_parallel(ps: ParallelState) -> None:
    if ps.distributed and dist.is_initialized():
        dist.destroy_process_group()
