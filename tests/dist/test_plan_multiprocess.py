"""The planner against training steps measured on gloo processes: for dp 2 (FSDP2) and ep 2 meshes, the
bytes each rank sends per step by collective (all-gather and reduce-scatter exact, all-to-all within 15%
of uniform routing), each rank's parameter, gradient and AdamW bytes (exact), and each rank's peak memory
of a step on top of its state (within 15%; profiled CPU allocations, which include FSDP2's gathered
weights and the exchanged expert rows)."""

from __future__ import annotations

import pytest
from alloc_trace import live_bytes
from ranks import run_ranks
from tiny import tiny_config
from torch.profiler import ProfilerActivity, profile

from moelab.dist.mesh import ParallelConfig
from moelab.dist.plan import plan
from moelab.dist.plan_mesh import Mesh
from moelab.train.measure_parallel import measure_steps

BATCH, SEQ = 8, 256
TOLERANCE = 0.15


def _measure(rank: int, world: int, ep: int) -> dict:
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    out = measure_steps(tiny_config(), ParallelConfig(ep=ep), batch_size=BATCH, seq_len=SEQ, steps=2,
                        around_last=prof)
    out["step_peak"] = live_bytes(prof)[0]
    return out


@pytest.mark.parametrize("ep", [1, 2], ids=["dp2", "ep2"])
def test_plan_matches_measured_ranks(ep):
    world = 2
    got = run_ranks(_measure, world, ep)
    p = plan(tiny_config(), Mesh(dp=world // ep, ep=ep), seq_len=SEQ, micro_batch=BATCH // world,
             precision="fp32", attention="math", expert_kernel="fused" if ep == 1 else "grouped")
    for r in got:
        sent = r["sent"]
        assert sent["all_gather"] == p.comm.fsdp_all_gather
        assert sent["reduce_scatter"] == p.comm.fsdp_reduce_scatter
        assert sent.get("all_to_all", 0.0) == pytest.approx(p.comm.all_to_all, rel=TOLERANCE)
        assert sent["all_reduce"] < 0.01 * sent["all_gather"]       # scalars only (norm, loads, losses)
        st = r["state_bytes"]
        assert st["parameters"] == p.weights_bytes and st["gradients"] == p.grads_bytes
        assert st["optimizer"] == p.optimizer_bytes
        assert p.peak_bytes - p.weights_bytes - p.optimizer_bytes == pytest.approx(r["step_peak"], rel=TOLERANCE)
