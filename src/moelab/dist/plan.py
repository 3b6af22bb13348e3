"""Plan a training run that cannot be run here: memory per GPU and communication per step, for any model
config, GPU count and ``dp × ep`` mesh (:mod:`moelab.dist.plan_mesh`), from arithmetic alone.

    p = plan(cfg, Mesh(dp=32, ep=64), seq_len=4096, micro_batch=1, gpu_memory=80e9)
    p.peak_bytes, p.peak_ckpt_bytes, p.max_micro_batch, p.comm.all_to_all, ...

Memory per rank (P_d non-expert parameters, P_r routed-expert parameters, n_d = ranks sharding P_d; bytes
per element from :data:`~moelab.dist.plan_activations.PRECISIONS`: bf16-mixed keeps fp32 master weights,
fp32 gradients and two fp32 AdamW moments, 16 bytes per parameter, and computes in bf16):

    parameters = (P_d/n_d + P_r/(dp·ep)) · param      (the routed experts: E/ep per rank, each sharded dp ways)
    gradients  = (P_d/n_d + P_r/(dp·ep)) · grad
    optimizer  = (P_d/n_d + P_r/(dp·ep)) · 2·moment   (AdamW's m and v)
    working    = FSDP2 buffers: the all-gathered weights of two neighbouring units (the current one and the
                 prefetched next, in compute dtype) and the largest unit's unsharded gradients (compute dtype,
                 plus the fp32 copy that is reduce-scattered), a unit being the embedding, a decoder layer
                 (its non-expert weights + its E/ep experts) or the final norm with the LM head; on one GPU
                 under bf16-mixed instead the bf16 casts autocast makes of the weights (kept for the backward)
    activations: :mod:`moelab.dist.plan_activations` (per layer: attention with MLA's latent, router,
                 routed experts with top-K, shared experts, norms; the logits), without and with activation
                 checkpointing

    peak = parameters + optimizer + working + max over the step's phases of (activations + gradients):
           the loss at the end of the forward; each block's backward, last to first, holding the
           activations of the blocks before it, its own working memory and the gradients written so far;
           the end of the backward, all gradients. (Gradients build up as activations are freed, so this
           is less than the plain sum of both.)

A micro-batch fits when its peak is within the budget ``gpu_memory·(1 − reserve) − context`` (default
reserve 10% for the allocator's fragmentation, context 1 GiB for the CUDA context, cuBLAS workspaces and
NCCL buffers); the plan reports the largest. Communication: :mod:`moelab.dist.plan_comm`.

Not modelled: pipeline or tensor parallelism, FSDP's padding of shards, the multi-token-prediction module,
routing imbalance beyond the ``expert_load`` factor, the memory of compiled kernels and the allocator's caching.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from moelab.config import ModelConfig
from moelab.dist.plan_activations import (
    PRECISIONS,
    AttentionKernel,
    ExpertKernel,
    Precision,
    activation_bytes,
    step_peak,
)
from moelab.dist.plan_comm import Communication, communication
from moelab.dist.plan_mesh import Mesh, check_mesh
from moelab.errors import ConfigError

GiB = 2**30


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a config by FSDP unit (counted on the meta device, like :mod:`moelab.model.accounting`)."""

    total: int
    routed: int
    embed: int                                # the input embedding (and the LM head when tied)
    head: int                                 # final norm + LM head (norm only when tied)
    layers: tuple[tuple[int, int], ...]       # per decoder layer: (non-expert, routed-expert) parameters
    activated: int                            # per token: all but the routed experts, plus K/E of them

    @property
    def dense(self) -> int:
        return self.total - self.routed


@functools.lru_cache(maxsize=16)
def _count(cfg_json: str) -> ParamCounts:
    from moelab.model.transformer import DeepSeekForCausalLM

    cfg = ModelConfig.model_validate_json(cfg_json)
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    embed = head = 0
    layers = [[0, 0] for _ in range(cfg.num_hidden_layers)]
    for name, prm in model.named_parameters():        # tied weights are yielded once
        n = prm.numel()
        if name.startswith("model.layers."):
            layers[int(name.split(".")[2])][1 if ".mlp.experts." in name else 0] += n
        elif name.startswith("model.embed_tokens."):
            embed += n
        else:
            head += n
    routed = sum(r for _, r in layers)
    total = embed + head + sum(d + r for d, r in layers)
    K, E = cfg.num_experts_per_tok or 0, cfg.n_routed_experts or 0
    return ParamCounts(total=total, routed=routed, embed=embed, head=head,
                       layers=tuple((d, r) for d, r in layers),
                       activated=total - routed + (routed * K // E if E else 0))


def count_params(cfg: ModelConfig) -> ParamCounts:
    return _count(cfg.model_dump_json())


@dataclass
class Plan:
    """Every number of a plan; bytes are per rank (GPU)."""

    gpus: int
    dp: int
    ep: int
    gpus_per_node: int
    dense_shard: str
    experts_per_rank: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    tokens_per_step: int                # over all ranks
    precision: str
    attention: str
    expert_kernel: str
    expert_load: float
    params_total: int
    params_activated: int
    params_routed: int
    params_per_rank: float
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    working_weights_bytes: float
    act_saved_bytes: float              # kept for the backward at the end of the forward
    act_saved_ckpt_bytes: float         # the same with activation checkpointing
    act_peak_bytes: float               # activations + gradients at the step's worst phase
    act_peak_ckpt_bytes: float
    act_breakdown: dict[str, float]     # act_saved_bytes by part
    peak_bytes: float                   # weights + optimizer + working + act_peak
    peak_ckpt_bytes: float
    gpu_memory_bytes: float | None
    budget_bytes: float | None          # gpu_memory · (1 − reserve) − context
    reserve: float
    context_bytes: float
    fits: bool | None
    fits_ckpt: bool | None
    max_micro_batch: int | None         # largest micro-batch within the budget (0: not even one)
    max_micro_batch_ckpt: int | None
    comm: Communication

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Static:
    weights: float
    grads: float
    optimizer: float
    working: float
    layer_grads: list[float]
    head_grads: float
    per_rank: float


def _static(params: ParamCounts, mesh: Mesh, p: Precision) -> _Static:
    n_d, world, ep = mesh.dense_group, mesh.world, mesh.ep
    per_rank = params.dense / n_d + params.routed / world
    layer_grads = [(d / n_d + r / world) * p.grad for d, r in params.layers]
    if world == 1:
        working = (params.total - params.embed) * p.compute if p.mixed else 0.0
    else:
        units = [params.embed] + [d + r / ep for d, r in params.layers] + [params.head]
        pairs = max(a + b for a, b in zip(units, units[1:], strict=False)) if len(units) > 1 else units[0]
        grad_bytes = p.compute + (p.reduce if p.reduce != p.compute else 0)
        working = pairs * p.compute + max(units) * grad_bytes
    return _Static(weights=per_rank * p.param, grads=per_rank * p.grad, optimizer=per_rank * 2 * p.moment,
                   working=working, layer_grads=layer_grads, head_grads=params.head / n_d * p.grad,
                   per_rank=per_rank)


def _peaks(cfg: ModelConfig, st: _Static, p: Precision, seq_len: int, micro_batch: int, attention: AttentionKernel,
           expert_kernel: ExpertKernel, load: float):
    acts = activation_bytes(cfg, p, seq_len, micro_batch, attention, expert_kernel, load)
    base = st.weights + st.optimizer + st.working
    peak = step_peak(acts, st.layer_grads, st.head_grads, st.grads, checkpointing=False)
    peak_ckpt = step_peak(acts, st.layer_grads, st.head_grads, st.grads, checkpointing=True)
    return acts, peak, peak_ckpt, base + peak, base + peak_ckpt


def _largest_micro_batch(cfg: ModelConfig, st: _Static, p: Precision, seq_len: int, budget: float,
                        checkpointing: bool, attention: AttentionKernel = "fused",
                        expert_kernel: ExpertKernel = "fused", load: float = 1.0, limit: int = 1 << 20) -> int:
    """The largest micro-batch (sequences of ``seq_len``) whose peak fits ``budget`` bytes; 0 if none does."""
    def fits(b: int) -> bool:
        _, _, _, total, total_ckpt = _peaks(cfg, st, p, seq_len, b, attention, expert_kernel, load)
        return (total_ckpt if checkpointing else total) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan(cfg: ModelConfig, mesh: Mesh, seq_len: int, micro_batch: int = 1, *, grad_accum: int = 1,
         precision: str = "bf16-mixed", attention: AttentionKernel = "fused", expert_kernel: ExpertKernel | None = None,
         expert_load: float = 1.0, gpu_memory: float | None = None, reserve: float = 0.10,
         context_bytes: float = 1 * GiB, payload_bytes: int | None = None, params: ParamCounts | None = None) -> Plan:
    """Memory per rank and communication per step of training ``cfg`` on ``mesh`` (module docstring).

    ``expert_kernel``: "fused" (one device's kernel, keeps only the gate/up pre-activations) or "grouped"
    (the modular dispatch → grouped GEMM → combine that expert parallelism uses); None = fused when ep = 1.
    ``expert_load``: rows the busiest rank's experts get, relative to uniform routing. ``payload_bytes``: the
    all-to-all element size (None = the compute dtype's). Raises :class:`ConfigError` for impossible input.
    """
    check_mesh(cfg, mesh)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    for name, value in (("seq_len", seq_len), ("grad_accum", grad_accum)):
        if value < 1:
            raise ConfigError(f"{name} must be positive (got {value})")
    if micro_batch < 0:
        raise ConfigError(f"micro_batch must not be negative (got {micro_batch})")
    if not 0 <= reserve < 1:
        raise ConfigError(f"the reserve is a fraction of the GPU memory in [0, 1) (got {reserve})")
    if expert_load < 1:
        raise ConfigError(f"expert_load is the busiest rank's load relative to uniform routing, >= 1 "
                          f"(got {expert_load})")
    p = PRECISIONS[precision]
    params = params or count_params(cfg)
    kernel: ExpertKernel = expert_kernel or ("fused" if mesh.ep == 1 else "grouped")
    st = _static(params, mesh, p)
    acts, peak, peak_ckpt, total, total_ckpt = _peaks(cfg, st, p, seq_len, micro_batch, attention, kernel, expert_load)
    budget = gpu_memory * (1 - reserve) - context_bytes if gpu_memory is not None else None
    fits = fits_ckpt = best = best_ckpt = None
    if budget is not None:
        fits, fits_ckpt = total <= budget, total_ckpt <= budget
        best, best_ckpt = (_largest_micro_batch(cfg, st, p, seq_len, budget, ck, attention, kernel, expert_load)
                           for ck in (False, True))
    comm = communication(cfg, mesh, p, micro_batch * seq_len, grad_accum, params.dense, params.routed,
                         payload_bytes)
    E = cfg.n_routed_experts or 0
    return Plan(
        gpus=mesh.world, dp=mesh.dp, ep=mesh.ep, gpus_per_node=mesh.gpus_per_node, dense_shard=mesh.dense_shard,
        experts_per_rank=E // mesh.ep if E else 0, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum,
        tokens_per_step=mesh.world * grad_accum * micro_batch * seq_len, precision=precision, attention=attention,
        expert_kernel=kernel, expert_load=expert_load, params_total=params.total, params_activated=params.activated,
        params_routed=params.routed, params_per_rank=st.per_rank, weights_bytes=st.weights, grads_bytes=st.grads,
        optimizer_bytes=st.optimizer, working_weights_bytes=st.working, act_saved_bytes=acts.saved,
        act_saved_ckpt_bytes=acts.saved_ckpt, act_peak_bytes=peak, act_peak_ckpt_bytes=peak_ckpt,
        act_breakdown=acts.breakdown, peak_bytes=total, peak_ckpt_bytes=total_ckpt, gpu_memory_bytes=gpu_memory,
        budget_bytes=budget, reserve=reserve, context_bytes=context_bytes, fits=fits, fits_ckpt=fits_ckpt,
        max_micro_batch=best, max_micro_batch_ckpt=best_ckpt, comm=comm)


__all__ = ["GiB", "Mesh", "ParamCounts", "Plan", "count_params", "plan"]
