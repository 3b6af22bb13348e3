"""Communication per optimizer step and rank: FSDP2's all-gathers and reduce-scatters, expert parallelism's
all-to-alls, and what node-limited routing bounds. Bytes are what one rank sends (a ring collective
receives as much), for ``grad_accum`` micro-batches of T = B·L tokens.

FSDP2 (per micro-batch; FSDP2 gathers in the forward, frees after it, gathers again in the backward and
reduce-scatters each micro-batch's gradients). n_d = ranks sharding the non-expert weights P_d (all
``dp·ep``, or ``dp``), P_r the routed-expert weights, g the gathered dtype's bytes (bf16 under bf16-mixed),
ρ the reduction dtype's bytes (fp32 under bf16-mixed, as moelab reduces gradients in fp32):

    all-gather     = 2 · ((n_d − 1)/n_d · P_d + (dp − 1)/dp · P_r/ep) · g
    reduce-scatter =     ((n_d − 1)/n_d · P_d + (dp − 1)/dp · P_r/ep) · ρ
    all-reduce     = 2 · (ep − 1)/ep · P_d/dp · ρ      only when the non-expert weights are sharded over dp
                                                       alone (replicas across the ep group, HSDP)

Expert parallelism (per micro-batch and MoE layer): each of the T tokens goes to K experts; under uniform
routing a fraction (ep − 1)/ep of those rows leaves the rank. Dispatch and combine in the forward, their
gradients in the backward (and the forward again when activation checkpointing recomputes the block):

    all-to-all     = passes · T·K·h·b · (ep − 1)/ep          passes = 4 (6 with checkpointing)
    cross-node     = passes · T·K·h·b · (ep − e_n)/ep         e_n = ranks of the group on this node

b is the payload dtype (bf16; DeepSeek-V3 dispatches in FP8, b = 1, and combines in bf16).

Node-limited routing (DeepSeek-V3 §2.1.2, §3.2.2): a token's experts lie in ``topk_group`` = M of ``n_group``
groups; when each node holds whole groups, a token reaches at most M nodes. Sending each token once per
destination node over InfiniBand and forwarding it over NVLink inside the node bounds the cross-node bytes
per token and pass by min(M, nodes − 1)·h·b, where a plain per-expert all-to-all sends up to K·h·b (V3: 4
against 8 rows of 7168). Under uniform routing a given node holds one of the token's groups with probability
1 − C(G − g_n, M)/C(G, M) (g_n groups per node), so a token expects (nodes − 1) times that many remote nodes
(V3: 7 · 1/2 = 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from moelab.config import ModelConfig
from moelab.dist.plan_activations import Precision
from moelab.dist.plan_mesh import Mesh


@dataclass
class Communication:
    """Bytes one rank sends per optimizer step (and the per-token node-limited figures)."""

    fsdp_all_gather: float
    fsdp_reduce_scatter: float
    hsdp_all_reduce: float
    all_to_all: float                  # every row that leaves the rank, without activation checkpointing
    all_to_all_ckpt: float             # with the recomputed forward's dispatch and combine
    all_to_all_cross_node: float       # the rows among them that leave the node (per-expert sends)
    cross_node_dedup_expected: float   # cross-node bytes when each token is sent once per node (expected)
    nodes_per_token_bound: int         # nodes a token's experts can lie on (M when nodes hold whole groups)
    remote_nodes_expected: float       # of those, other than the token's own, under uniform routing
    cross_node_token_bytes_bound: float  # per token and pass, sent once per node: min(M, nodes − 1)·h·b
    cross_node_token_bytes_naive: float  # per token and pass, one row per expert: K·h·b


def _frac(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def node_reach(cfg: ModelConfig, mesh: Mesh) -> tuple[int, float]:
    """(nodes a token's K experts can lie on, expected remote nodes it reaches under uniform routing)."""
    nodes = mesh.ep_nodes
    E, K = cfg.n_routed_experts or 0, cfg.num_experts_per_tok or 0
    if nodes <= 1 or not E:
        return min(nodes, max(K, 1)), 0.0
    G, M = cfg.n_group or 1, cfg.topk_group or 1
    limited = cfg.topk_method != "greedy" and G > 1
    if limited and G % nodes == 0:                    # every node holds G/nodes whole groups
        per_node = G // nodes
        touched = 1 - comb(G - per_node, M) / comb(G, M)
        return min(M, nodes), (nodes - 1) * touched
    bound = min(K, nodes)
    if limited and nodes % G == 0:                    # a group spans nodes/G nodes
        bound = min(bound, M * (nodes // G))
    per_node = E // nodes                             # K distinct experts drawn uniformly
    touched = 1 - comb(E - per_node, K) / comb(E, K)
    return bound, (nodes - 1) * touched


def communication(cfg: ModelConfig, mesh: Mesh, p: Precision, tokens: int, grad_accum: int,
                  dense_params: int, routed_params: int, payload_bytes: int | None = None) -> Communication:
    """The formulas above for ``tokens`` = B·L tokens per micro-batch on each rank."""
    g, rho = p.compute, p.reduce
    n_d, dp, ep = mesh.dense_group, mesh.dp, mesh.ep
    shard = _frac(n_d) * dense_params + _frac(dp) * routed_params / ep
    ag = 2 * shard * g * grad_accum
    rs = shard * rho * grad_accum
    ar = 2 * _frac(ep) * dense_params / dp * rho * grad_accum if mesh.dense_shard == "dp" else 0.0
    K, h = cfg.num_experts_per_tok or 0, cfg.hidden_size
    b = payload_bytes or p.compute
    n_moe = len(cfg.moe_layer_ids)
    rows = grad_accum * n_moe * tokens * K * h * b          # bytes of all routed rows, one pass
    local = min(ep, mesh.gpus_per_node)
    nodes_bound, remote = node_reach(cfg, mesh)
    bound = min(nodes_bound, mesh.ep_nodes - 1) * h * b if ep > 1 else 0
    return Communication(
        fsdp_all_gather=ag, fsdp_reduce_scatter=rs, hsdp_all_reduce=ar,
        all_to_all=4 * rows * _frac(ep), all_to_all_ckpt=6 * rows * _frac(ep),
        all_to_all_cross_node=4 * rows * (ep - local) / ep if ep > 1 else 0.0,
        cross_node_dedup_expected=4 * grad_accum * n_moe * tokens * remote * h * b,
        nodes_per_token_bound=nodes_bound if ep > 1 else 1, remote_nodes_expected=remote,
        cross_node_token_bytes_bound=bound, cross_node_token_bytes_naive=K * h * b if ep > 1 else 0)
