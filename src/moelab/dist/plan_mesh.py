"""The parallel layout the planner assumes, and the command-line values that describe it.

A mesh is ``dp × ep`` ranks (``dp·ep`` = the GPU count); every rank trains on its own micro-batch:

* **expert parallelism** over ``ep``: each rank holds ``E/ep`` of every MoE layer's routed experts, and the
  tokens travel to them and back by all-to-all. The ``ep`` ranks of a group are neighbours (the fast
  dimension), so a group of ``ep ≤ gpus_per_node`` stays inside a node and one of ``ep = k·gpus_per_node``
  spans ``k`` whole nodes.
* **FSDP2** for everything: the routed experts of a rank are sharded again over the ``dp`` ranks that hold
  the same experts; the other weights (attention, norms, router, shared experts, dense layers, embeddings,
  LM head) are sharded over all ``dp·ep`` ranks (``dense_shard = "world"``, as expert parallelism borrowed
  from the data-parallel dimension does), or only over ``dp`` (``"dp"``: replicated across the ``ep`` group).

Default ``--mesh``: ``ep`` = the largest divisor of the expert count that also divides the GPU count and is
at most ``min(gpus, gpus_per_node)`` (expert parallelism inside a node, where all-to-all is fastest);
``dp = gpus / ep``. A dense model gets ``ep = 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moelab.config import ModelConfig
from moelab.errors import ConfigError, did_you_mean

DenseShard = Literal["world", "dp"]


@dataclass(frozen=True)
class Mesh:
    dp: int
    ep: int = 1
    gpus_per_node: int = 8
    dense_shard: DenseShard = "world"

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def dense_group(self) -> int:
        """Ranks the non-expert weights are sharded over."""
        return self.world if self.dense_shard == "world" else self.dp

    @property
    def ep_nodes(self) -> int:
        """Nodes an expert-parallel group spans."""
        return -(-self.ep // self.gpus_per_node)

    def describe(self) -> str:
        return f"dp={self.dp} × ep={self.ep}"


def check_mesh(cfg: ModelConfig, mesh: Mesh, gpus: int | None = None) -> None:
    """Refuse (one-line :class:`ConfigError`) a mesh that cannot lay out this model on ``gpus`` GPUs."""
    if mesh.dp < 1 or mesh.ep < 1:
        raise ConfigError(f"mesh sizes must be positive (got dp={mesh.dp}, ep={mesh.ep})")
    if mesh.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be positive (got {mesh.gpus_per_node})")
    if gpus is not None and mesh.world != gpus:
        raise ConfigError(f"mesh dp={mesh.dp} × ep={mesh.ep} = {mesh.world} ranks, but --gpus is {gpus}; "
                          "the product of the mesh must equal the GPU count")
    E = cfg.n_routed_experts or 0
    if mesh.ep > 1 and not E:
        raise ConfigError(f"ep={mesh.ep} needs routed experts, but this is a dense model; use ep=1")
    if mesh.ep > E > 0:
        raise ConfigError(f"ep={mesh.ep} is larger than the {E} routed experts: each rank must hold at least one")
    if E and E % mesh.ep:
        raise ConfigError(f"ep={mesh.ep} does not divide the {E} routed experts; pick a divisor of {E} "
                          f"(e.g. {_largest_divisor(E, mesh.ep)})")
    if mesh.ep > mesh.gpus_per_node and mesh.ep % mesh.gpus_per_node:
        raise ConfigError(f"ep={mesh.ep} spans nodes of {mesh.gpus_per_node} GPUs but is not a multiple of "
                          f"{mesh.gpus_per_node}; expert-parallel groups must fill whole nodes")


def _largest_divisor(n: int, at_most: int, also: int | None = None) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0 and (also is None or also % d == 0))


def default_mesh(cfg: ModelConfig, gpus: int, gpus_per_node: int = 8, dense_shard: DenseShard = "world") -> Mesh:
    """``ep`` = the largest divisor of the expert count (and of ``gpus``) ≤ ``min(gpus, gpus_per_node)``."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be positive (got {gpus})")
    E = cfg.n_routed_experts or 0
    ep = _largest_divisor(E, min(gpus, gpus_per_node), also=gpus) if E else 1
    return Mesh(dp=gpus // ep, ep=ep, gpus_per_node=gpus_per_node, dense_shard=dense_shard)


def parse_mesh(text: str, gpus: int, gpus_per_node: int = 8, dense_shard: DenseShard = "world") -> Mesh:
    """``"dp=32,ep=64"`` -> :class:`Mesh`. One size may be left out: it is ``gpus`` divided by the other."""
    sizes: dict[str, int] = {}
    for item in (s.strip() for s in text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--mesh {text!r}: write it as dp=N,ep=M (got {item!r})")
        if key not in ("dp", "ep"):
            raise ConfigError(f"--mesh {text!r}: unknown dimension {key!r} (the mesh has dp and ep)"
                              f"{did_you_mean(key, ('dp', 'ep'))}")
        if key in sizes:
            raise ConfigError(f"--mesh {text!r}: {key} is given twice")
        if not re.fullmatch(r"\s*[0-9]+\s*", value) or int(value) < 1:
            raise ConfigError(f"--mesh {text!r}: {key} must be a positive integer (got {value.strip()!r})")
        sizes[key] = int(value)
    for known, missing in (("dp", "ep"), ("ep", "dp")):
        if missing not in sizes:
            if gpus % sizes[known]:
                raise ConfigError(f"--mesh {text!r}: {known}={sizes[known]} does not divide --gpus {gpus}")
            sizes[missing] = gpus // sizes[known]
    return Mesh(dp=sizes["dp"], ep=sizes["ep"], gpus_per_node=gpus_per_node, dense_shard=dense_shard)


_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """``"80GB"`` -> 80·10⁹ bytes, ``"141GiB"`` -> 141·2³⁰; a bare number is GB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"cannot read the memory size {text!r}; write e.g. 80GB, 141GB or 96GiB")
    return int(float(m.group(1)) * _UNITS[unit])
