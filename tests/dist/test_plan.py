"""The planner's arithmetic against DeepSeek-V3's published numbers (arXiv 2412.19437) and against the
formulas in moelab.dist.plan / plan_comm written out by hand; meshes it must refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.config import load_model_config, make_config
from moelab.dist.plan import GiB, count_params, plan
from moelab.dist.plan_mesh import Mesh, check_mesh, default_mesh, parse_memory, parse_mesh
from moelab.errors import ConfigError
from moelab.model.accounting import model_budget

ROOT = Path(__file__).resolve().parents[2]
V3 = load_model_config(ROOT / "configs" / "deepseek-v3.toml")
TINY = load_model_config(ROOT / "configs" / "tiny.toml")


def _tiny(**changes):
    return make_config({**TINY.model_dump(exclude_none=True), **changes})


def test_v3_parameters_match_the_paper_and_moelab_accounting():
    counts, budget = count_params(V3), model_budget(V3)
    assert counts.total == budget.total_params and counts.activated == budget.activated_params
    assert counts.routed == budget.routed_expert_params
    assert abs(counts.total / 671e9 - 1) < 0.02                 # 671B total (Abstract)
    assert abs(counts.activated / 37e9 - 1) < 0.02              # 37B activated per token


def test_v3_on_the_papers_cluster():
    """2048 GPUs, 64-way expert parallelism over 8 nodes (§3.2): 4 routed experts per GPU; node-limited
    routing (M = 4 of 8 groups = nodes, §2.1.2) bounds a token's cross-node rows to 4 instead of 8."""
    p = plan(V3, Mesh(dp=32, ep=64), seq_len=4096, micro_batch=1, gpu_memory=80e9)
    h, b, T = 7168, 2, 4096
    assert p.gpus == 2048 and p.experts_per_rank == 4
    c = p.comm
    assert c.nodes_per_token_bound == 4
    assert c.cross_node_token_bytes_bound == 4 * h * b
    assert c.cross_node_token_bytes_naive == 8 * h * b
    assert c.remote_nodes_expected == pytest.approx(3.5)       # 7 other nodes, each holds 1 of 8 groups, 4 kept
    rows = 58 * T * 8 * h * b                                   # 58 MoE layers, all K rows, one pass
    assert c.all_to_all == pytest.approx(4 * rows * 63 / 64)
    assert c.all_to_all_ckpt == pytest.approx(6 * rows * 63 / 64)
    assert c.all_to_all_cross_node == pytest.approx(4 * rows * 56 / 64)
    assert c.cross_node_dedup_expected == pytest.approx(4 * 58 * T * 3.5 * h * b)
    # the parameter state: 16 bytes per parameter (fp32 master, fp32 grad, two fp32 moments), sharded
    counts = count_params(V3)
    per_rank = counts.dense / 2048 + counts.routed / 64 / 32
    assert p.params_per_rank == pytest.approx(per_rank)
    assert p.weights_bytes + p.grads_bytes + p.optimizer_bytes == pytest.approx(16 * per_rank)
    # 4,096 tokens of all 61 layers do not fit 80 GB without checkpointing; with it they do
    assert not p.fits and p.fits_ckpt
    assert p.max_micro_batch == 0 and p.max_micro_batch_ckpt >= 1
    assert p.act_saved_ckpt_bytes < p.act_saved_bytes / 10


def test_fsdp_and_all_to_all_volumes_by_hand():
    cfg = _tiny()
    counts = count_params(cfg)
    p = plan(cfg, Mesh(dp=2, ep=4), seq_len=256, micro_batch=3, grad_accum=2)
    shard = 7 / 8 * counts.dense + 1 / 2 * counts.routed / 4
    assert p.comm.fsdp_all_gather == pytest.approx(2 * 2 * shard * 2)       # 2 micro-batches, fwd + bwd, bf16
    assert p.comm.fsdp_reduce_scatter == pytest.approx(2 * shard * 4)       # fp32 gradients
    assert p.comm.hsdp_all_reduce == 0
    tokens, K, h, n_moe = 3 * 256, 4, 128, 3
    assert p.comm.all_to_all == pytest.approx(2 * 4 * n_moe * tokens * K * h * 2 * 3 / 4)
    assert p.comm.all_to_all_cross_node == 0 and p.comm.cross_node_token_bytes_bound == 0   # one node
    # dense weights sharded over dp only: replicas across ep all-reduce their shard
    q = plan(cfg, Mesh(dp=2, ep=4, dense_shard="dp"), seq_len=256, micro_batch=3, grad_accum=2)
    assert q.comm.hsdp_all_reduce == pytest.approx(2 * 2 * 3 / 4 * counts.dense / 2 * 4)
    assert q.weights_bytes == pytest.approx((counts.dense / 2 + counts.routed / 8) * 4)


def test_one_gpu_has_no_communication_and_unsharded_state():
    cfg = _tiny()
    counts = count_params(cfg)
    p = plan(cfg, Mesh(dp=1), seq_len=128, micro_batch=2, precision="fp32")
    assert p.weights_bytes == p.grads_bytes == 4 * counts.total and p.optimizer_bytes == 8 * counts.total
    assert p.working_weights_bytes == 0                          # fp32: no casts, no FSDP
    c = p.comm
    assert c.fsdp_all_gather == c.fsdp_reduce_scatter == c.all_to_all == 0
    mixed = plan(cfg, Mesh(dp=1), seq_len=128, micro_batch=2)     # bf16 casts of the weights, kept for backward
    assert mixed.working_weights_bytes == 2 * (counts.total - counts.embed)
    pure = plan(cfg, Mesh(dp=1), seq_len=128, micro_batch=2, precision="bf16")
    assert pure.weights_bytes + pure.grads_bytes + pure.optimizer_bytes == 8 * counts.total


def test_largest_micro_batch_is_the_largest_that_fits():
    cfg = _tiny()
    mesh = Mesh(dp=4, ep=2)
    p = plan(cfg, mesh, seq_len=1024, micro_batch=1, gpu_memory=2e9, reserve=0.1, context_bytes=0.5 * GiB)
    assert p.budget_bytes == pytest.approx(2e9 * 0.9 - 0.5 * GiB)
    for best, key in ((p.max_micro_batch, "peak_bytes"), (p.max_micro_batch_ckpt, "peak_ckpt_bytes")):
        assert best > 1
        at = plan(cfg, mesh, seq_len=1024, micro_batch=best, gpu_memory=2e9, context_bytes=0.5 * GiB)
        over = plan(cfg, mesh, seq_len=1024, micro_batch=best + 1, gpu_memory=2e9, context_bytes=0.5 * GiB)
        assert getattr(at, key) <= p.budget_bytes < getattr(over, key)
    assert p.max_micro_batch_ckpt > p.max_micro_batch


def test_activations_scale_with_tokens_and_checkpointing_saves():
    a = plan(V3, Mesh(dp=256, ep=8), seq_len=4096, micro_batch=1)
    b = plan(V3, Mesh(dp=256, ep=8), seq_len=4096, micro_batch=2)
    mask = 61 * 2 * 4096**2                                        # per layer and micro-batch, not per sequence
    assert b.act_saved_bytes - mask == pytest.approx(2 * (a.act_saved_bytes - mask))
    assert sum(a.act_breakdown.values()) == pytest.approx(a.act_saved_bytes)
    assert a.peak_ckpt_bytes < a.peak_bytes
    assert a.expert_kernel == "grouped"                            # expert parallelism: the modular path
    fused = plan(V3, Mesh(dp=256, ep=8), seq_len=4096, micro_batch=1, expert_kernel="fused")
    assert fused.act_breakdown["routed experts"] < a.act_breakdown["routed experts"] / 4


def test_default_mesh():
    assert default_mesh(V3, 2048) == Mesh(dp=256, ep=8)            # EP inside a node of 8
    assert default_mesh(V3, 4) == Mesh(dp=1, ep=4)
    assert default_mesh(_tiny(), 6) == Mesh(dp=3, ep=2)            # divides both 16 experts and 6 GPUs
    assert default_mesh(_tiny(n_routed_experts=None, first_k_dense_replace=0), 16) == Mesh(dp=16, ep=1)
    assert default_mesh(V3, 64, gpus_per_node=4) == Mesh(dp=16, ep=4, gpus_per_node=4)


def test_parse_mesh_and_memory():
    assert parse_mesh("dp=32,ep=64", 2048) == Mesh(dp=32, ep=64)
    assert parse_mesh(" ep = 64 ", 2048) == Mesh(dp=32, ep=64)
    assert parse_mesh("dp=32", 2048) == Mesh(dp=32, ep=64)
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("96GiB") == 96 * 2**30
    assert parse_memory("141") == 141 * 10**9
    assert parse_memory("0.5 TB") == 5 * 10**11


@pytest.mark.parametrize("text, message", [
    ("dp32,ep=64", "write it as dp=N,ep=M"),
    ("dp=32;ep=64", "dp must be a positive integer"),
    ("tp=2", "unknown dimension 'tp'"),
    ("dp=0,ep=64", "dp must be a positive integer"),
    ("dp=x", "dp must be a positive integer"),
    ("ep=3", "does not divide --gpus 2048"),
    ("ep=2,ep=4", "ep is given twice"),
])
def test_bad_mesh_text(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_mesh(text, 2048)


@pytest.mark.parametrize("mesh, gpus, message", [
    (Mesh(dp=30, ep=64), 2048, "= 1920 ranks, but --gpus is 2048"),
    (Mesh(dp=1, ep=512), 512, "larger than the 256 routed experts"),
    (Mesh(dp=8, ep=3), 24, "ep=3 does not divide the 256 routed experts"),
    (Mesh(dp=1, ep=12), 12, "ep=12 does not divide the 256 routed experts"),
    (Mesh(dp=2, ep=32, gpus_per_node=6), 64, "not a multiple of 6"),
])
def test_impossible_meshes(mesh, gpus, message):
    with pytest.raises(ConfigError, match=message):
        check_mesh(V3, mesh, gpus)


def test_dense_model_refuses_expert_parallelism_and_bad_settings():
    dense = _tiny(n_routed_experts=None, first_k_dense_replace=0)
    with pytest.raises(ConfigError, match="dense model"):
        check_mesh(dense, Mesh(dp=2, ep=2), 4)
    for kwargs, message in (({"precision": "fp16"}, "unknown precision"), ({"reserve": 1.0}, "reserve"),
                            ({"grad_accum": 0}, "grad_accum must be positive")):
        with pytest.raises(ConfigError, match=message):
            plan(dense, Mesh(dp=2), seq_len=64, **kwargs)
    with pytest.raises(ConfigError, match="memory size"):
        parse_memory("eighty")
