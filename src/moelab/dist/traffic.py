"""Count what a rank sends: the bytes of every collective FSDP2, DDP and expert parallelism issue, by kind,
and the wall time spent inside them — to check :mod:`moelab.dist.plan_comm` against a real run and to
measure the all-to-all share of a step (``benchmarks/scaling.py``).

    with Traffic() as t:
        train_step(...)
    t.sent["all_to_all"], t.seconds["all_to_all"], t.calls["all_gather"]

Bytes sent by one rank of a group of n, as a ring (or pairwise) algorithm moves them — the same
convention as the planner:

    all-gather      (n − 1) · input                  (each rank's shard reaches the n − 1 others)
    reduce-scatter  (n − 1)/n · input
    all-reduce      2 · (n − 1)/n · tensor
    all-to-all      the input rows addressed to other ranks (uneven splits counted exactly)

The functions of ``torch.distributed`` are wrapped while the context is open (callers that look them up
as ``dist.<name>`` at call time, as FSDP2 and moelab do, are counted); wall time includes waiting for the
slowest peer, which is what a step pays.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict

import torch
import torch.distributed as dist

_KINDS = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
          "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
          "all_reduce": "all_reduce", "all_to_all_single": "all_to_all"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sent_bytes(name: str, a: dict) -> float:
    """Bytes this rank sends in ``torch.distributed.<name>`` called with the arguments ``a`` (by parameter
    name; module docstring)."""
    group = a.get("group")
    n = dist.get_world_size(group)
    if n == 1:
        return 0.0
    if name in ("all_gather_single", "all_gather_into_tensor"):
        return (n - 1) * _nbytes(a["input_tensor"])
    if name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        return (n - 1) / n * _nbytes(a["input"])
    if name == "all_reduce":
        return 2 * (n - 1) / n * _nbytes(a["tensor"])
    inp, splits = a["input"], a.get("input_split_sizes")                    # all_to_all_single
    if not splits:                                                           # even splits
        return (n - 1) / n * _nbytes(inp)
    me = dist.get_group_rank(group, dist.get_rank()) if group is not None else dist.get_rank()
    return (sum(splits) - splits[me]) * _nbytes(inp) / max(inp.shape[0], 1)


class Traffic:
    """A context that counts bytes sent, calls and seconds per collective kind on this rank."""

    def __init__(self):
        self.sent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, fn):
        kind, signature = _KINDS[name], inspect.signature(fn)

        def counted(*args, **kwargs):
            self.sent[kind] += sent_bytes(name, signature.bind(*args, **kwargs).arguments)
            self.calls[kind] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - t0

        return counted

    def __enter__(self) -> Traffic:
        for name in _KINDS:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def summary(self) -> dict:
        return {"sent": dict(self.sent), "calls": dict(self.calls), "seconds": dict(self.seconds)}


__all__ = ["Traffic", "sent_bytes"]
