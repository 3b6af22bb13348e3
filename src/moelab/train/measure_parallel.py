"""Measure training steps of one rank of a torchrun job (or of one process): tokens/s, the bytes each
collective kind sends (:class:`moelab.dist.traffic.Traffic`), the time spent inside them, and the bytes of
this rank's parameters, gradients and AdamW states — the numbers ``moelab plan`` predicts, for
``benchmarks/scaling.py`` and the planner's tests.

    out = measure_steps(model_cfg, ParallelConfig(ep=2), batch_size=8, seq_len=64, steps=5)
    out["sent"]["all_to_all"], out["tokens_per_s"], out["state_bytes"]["optimizer"]

Steps run on random token ids (a pure function of seed and step, identical on every rank before each
takes its rows), after one warm-up step that creates the optimizer's states; ``train_step`` as
``moelab train`` runs it (fp32 unless ``dtype`` says otherwise).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.distributed.tensor import DTensor

from moelab.config import ModelConfig
from moelab.dist.mesh import ParallelConfig, init_parallel
from moelab.dist.traffic import Traffic
from moelab.dist.wrap import parallelize
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.train.balance import Balancer
from moelab.train.config import BalanceConfig, TrainConfig
from moelab.train.step import build_optimizer, train_step


class RandomTokens:
    """``batch(B, T, step, micro, seed)`` -> (x, y) ``[B, T]`` of random ids (the same on every rank)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def batch(self, batch_size: int, seq_len: int, step: int, micro: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + micro)
        ids = torch.randint(0, self.vocab, (batch_size, seq_len + 1), generator=g)
        return ids[:, :-1], ids[:, 1:]


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(model_cfg: ModelConfig, parallel: ParallelConfig, batch_size: int, seq_len: int, steps: int,
                  dtype: str = "float32", balance: BalanceConfig | None = None, seed: int = 0,
                  around_last=None, device: str = "cpu") -> dict:
    """Train ``steps`` measured steps (after one warm-up) on this rank; returns per-step averages.
    ``around_last``: a context manager the last step runs in (e.g. a memory profiler)."""
    ps = init_parallel(parallel, torch.device(device), model_cfg.n_routed_experts or 0, batch_size)
    tc = TrainConfig(steps=steps + 1, batch_size=batch_size, dtype=dtype, device=device, lr=1e-3, warmup_steps=0)
    model = DeepSeekForCausalLM.from_config(model_cfg, seed=seed).to(ps.device)
    balancer = Balancer(model, balance or BalanceConfig())
    parallelize(model, ps)
    optimizer = build_optimizer(model, tc)
    data = RandomTokens(model_cfg.vocab_size)
    train_step(model, data, balancer, optimizer, tc, seq_len, 0, None, ps)
    balancer.step(0)
    ps.barrier()
    with Traffic() as traffic:
        _sync(ps.device)
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            with around_last if step == steps and around_last is not None else contextlib.nullcontext():
                train_step(model, data, balancer, optimizer, tc, seq_len, step, None, ps)
            balancer.step(0)
        _sync(ps.device)
        seconds = time.perf_counter() - t0
    balancer.detach()
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    moments = [v for st in optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return {
        "rank": ps.rank, "world": ps.world, "dp": ps.dp, "ep": ps.ep,
        "tokens_per_s": steps * batch_size * seq_len / seconds,       # of the global batch
        "step_s": seconds / steps,
        "sent": {k: v / steps for k, v in traffic.sent.items()},
        "calls": {k: v / steps for k, v in traffic.calls.items()},
        "comm_s": {k: v / steps for k, v in traffic.seconds.items()},
        "state_bytes": {"parameters": _local_bytes(params), "gradients": _local_bytes(trainable),
                        "optimizer": _local_bytes(moments)},
    }


__all__ = ["RandomTokens", "measure_steps"]
