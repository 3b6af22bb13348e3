"""Expert load balancing: the auxiliary-loss-free bias, auxiliary losses, and MaxVio (docs/methods.md §3).

Legend: L MoE layers, E routed experts, K experts per token, N tokens (= B·T), B sequences.

    loss-free (2408.15664 Alg. 1):  b_i += u · sign(mean(c) − c_i)   once per optimizer step,
        c = expert assignment counts summed over every micro-batch of the step (and over data-parallel
        ranks); step t+1 routes with the bias built from step t's loads — a batch never sees its own.
    expert-level aux loss (2401.06066 eq. 12-14):  α·Σ_i f_i·P_i,
        f_i = E/(K·N)·Σ_t 1[t→i],   P_i = (1/N)·Σ_t s'_{i,t}     (f over the global batch under torchrun)
    sequence-wise (2412.19437 §2.1.2): the same per sequence (N = T), averaged over the batch
    device-level: f'_d = mean_{i∈d} f_i,  P'_d = Σ_{i∈d} P_i,  α₂·Σ_d f'_d·P'_d
    MaxVio = (max_i load_i − mean load) / mean load, averaged over MoE layers

``s'`` is the router score normalised over experts (softmax scores already are; sigmoid scores are
divided by their sum, as in the V3 sequence-wise loss), so a perfectly balanced router gives loss α.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from moelab.errors import ConfigError
from moelab.model.expert_ops import expert_counts
from moelab.model.moe import DeepSeekMoE
from moelab.model.router import Routing
from moelab.train.config import BalanceConfig

#: The per-layer count buffer a :class:`Balancer` adds to each MoE layer (non-persistent: never saved).
LOAD = "balance_load"


def maxvio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio over the last dimension: ``(max − mean)/mean`` of expert loads ``[..., E]``."""
    load = load.to(torch.float64)
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean.clamp_min(1e-12)


def _normalised_scores(r: Routing) -> torch.Tensor:
    s = r.scores
    return s / s.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def load_fractions(indices: torch.Tensor, n_experts: int, dtype: torch.dtype,
                   across_ranks: bool = False) -> torch.Tensor:
    """``f_i = E/(K·N)·Σ_t 1[t→i]`` ``[E]`` for indices ``[N, K]`` (no gradient). ``across_ranks``: counts
    and N summed over every rank of a torchrun job (the global batch; one all-reduce)."""
    N, K = indices.shape
    counts = expert_counts(indices, n_experts).to(torch.float64)
    if across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        counts = torch.cat([counts, counts.new_tensor([N])])
        dist.all_reduce(counts)
        counts, N = counts[:-1], float(counts[-1])
    return (counts * n_experts / (K * N)).to(dtype)


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int,
                        across_ranks: bool = False) -> torch.Tensor:
    """``Σ_i f_i·P_i`` for one group of tokens: scores ``[N, E]`` (normalised), indices ``[N, K]``.

    ``across_ranks``: f over the global batch, P over this rank's tokens. With every rank's loss averaged
    (data-parallel gradients are means), the gradient is that of ``Σ_i f_i·P_i`` with both global."""
    f = load_fractions(indices, n_experts, scores.dtype, across_ranks)
    return (f * scores.mean(dim=0)).sum()


def device_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, n_devices: int,
                        across_ranks: bool = False) -> torch.Tensor:
    f = load_fractions(indices, n_experts, scores.dtype, across_ranks).view(n_devices, -1).mean(dim=1)
    P = scores.mean(dim=0).view(n_devices, -1).sum(dim=1)
    return (f * P).sum()


class Balancer:
    """Watches every DeepSeekMoE layer of a model (as a routing observer) to count expert loads,
    build auxiliary losses and update the loss-free bias.

    Training forwards (``module.training``) are counted for the bias and MaxVio_batch; evaluation
    forwards are counted only inside :meth:`measure` (MaxVio_global) and never move the bias.

    Each MoE layer counts into a buffer of its own (``balance_load`` ``[2, E]`` int64: training, evaluation;
    not saved), where its routing runs: no per-layer Python state in the observer, so whole blocks compiled
    with ``torch.compile`` share one graph across layers (an index looked up by module would specialise
    the graph per layer, and past dynamo's recompile limit the remaining layers would run eagerly).
    """

    def __init__(self, model: torch.nn.Module, cfg: BalanceConfig):
        self.cfg = cfg
        self.layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
        self.layer_ids = [m.layer_idx for m in self.layers]
        E = self.layers[0].gate.n_experts if self.layers else 0
        self.n_experts = E
        self.top_k = self.layers[0].gate.top_k if self.layers else 0
        if cfg.method == "loss_free" and self.layers and self.layers[0].gate.e_score_correction_bias is None:
            raise ConfigError("balance.method = 'loss_free' needs the routing bias: set model.topk_method = "
                              "'noaux_tc' (with n_group = 1 for plain top-k), or choose balance.method = 'aux_loss'")
        if cfg.n_devices > 1 and E % cfg.n_devices:
            raise ConfigError(f"balance.n_devices ({cfg.n_devices}) must divide n_routed_experts ({E})")
        self._measuring = False
        self._frozen = False
        self._aux: list[torch.Tensor] = []
        if any(LOAD in m._buffers for m in self.layers):
            raise RuntimeError("this model already has a Balancer attached (one per model: both would count "
                               "into the same buffers); call detach() on the old one first")
        for m in self.layers:
            m.register_buffer(LOAD, torch.zeros(2, E, dtype=torch.long, device=m.gate.weight.device),
                              persistent=False)
            m.routing_observers.append(self._observe)

    def _loads(self, row: int) -> torch.Tensor:
        if not self.layers:
            return torch.zeros(0, self.n_experts, dtype=torch.float64)
        return torch.stack([getattr(m, LOAD)[row] for m in self.layers]).to(torch.float64)

    @property
    def counts(self) -> torch.Tensor:
        """Routed rows per layer and expert ``[L, E]`` (fp64) of the training forwards since the last step."""
        return self._loads(0)

    @property
    def eval_counts(self) -> torch.Tensor:
        """The same for the evaluation forwards of the last :meth:`measure` block."""
        return self._loads(1)

    def _reset(self, row: int) -> None:
        for m in self.layers:
            getattr(m, LOAD)[row].zero_()

    @property
    def wants_aux(self) -> bool:
        c = self.cfg
        return (c.method == "aux_loss" and (c.aux_alpha > 0 or c.device_alpha > 0)) or c.seq_aux_alpha > 0

    def state_dict(self) -> dict:
        """What a checkpoint must carry beyond the model (the bias itself is a model buffer)."""
        return {"bias_frozen": self._frozen}

    def load_state_dict(self, state: dict) -> None:
        self._frozen = bool(state.get("bias_frozen", False))

    def detach(self) -> None:
        for m in self.layers:
            if self._observe in m.routing_observers:
                m.routing_observers.remove(self._observe)
            m._buffers.pop(LOAD, None)

    # -- observation ----------------------------------------------------------------------------
    def _observe(self, module: DeepSeekMoE, r: Routing) -> None:
        if r.replay:      # activation checkpointing recomputes: same saved tensors, nothing counted twice
            if module.training and self.wants_aux and torch.is_grad_enabled():
                self._aux_loss(r)
            return
        if module.training or self._measuring:
            with torch.no_grad():   # counted where the routing is: no host sync per layer on a GPU
                load = getattr(module, LOAD)
                load[0 if module.training else 1] += expert_counts(r.indices, self.n_experts).to(load.device)
        if module.training and self.wants_aux and torch.is_grad_enabled():
            self._aux.append(self._aux_loss(r))

    def _aux_loss(self, r: Routing) -> torch.Tensor:
        c, E = self.cfg, self.n_experts
        s = _normalised_scores(r)
        loss = s.new_zeros(())
        if c.method == "aux_loss":
            if c.aux_kind == "expert" and c.aux_alpha > 0:
                loss = loss + c.aux_alpha * expert_balance_loss(s, r.indices, E, across_ranks=True)
            elif c.aux_kind == "sequence" and c.aux_alpha > 0:
                loss = loss + c.aux_alpha * self._sequence_loss(r, s)
            if c.device_alpha > 0 and c.n_devices > 1:
                loss = loss + c.device_alpha * device_balance_loss(s, r.indices, E, c.n_devices, across_ranks=True)
        if c.seq_aux_alpha > 0:
            loss = loss + c.seq_aux_alpha * self._sequence_loss(r, s)
        return loss

    def _sequence_loss(self, r: Routing, s: torch.Tensor) -> torch.Tensor:
        B, T = r.batch_shape if r.batch_shape and len(r.batch_shape) == 2 else (1, s.shape[0])
        if self.cfg.seq_aux_indicator == "unbiased_topk":
            idx = torch.topk(r.scores, k=self.top_k, dim=-1).indices
        else:
            idx = r.indices
        s_b, idx_b = s.view(B, T, -1), idx.view(B, T, -1)
        return torch.stack([expert_balance_loss(s_b[b], idx_b[b], self.n_experts) for b in range(B)]).mean()

    # -- per step ---------------------------------------------------------------------------------
    def pop_aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses collected since the last call (None if there are none)."""
        if not self._aux:
            return None
        total = torch.stack(self._aux).sum()
        self._aux.clear()
        return total

    @torch.no_grad()
    def step(self, tokens_seen: int = 0) -> dict:
        """Call once per optimizer step, after backward: all-reduce the step's loads, update the bias
        (loss-free), reset the counts. Returns MaxVio_batch (mean over layers, and per layer)."""
        if not self.layers:
            return {}
        loads = self.counts                                   # a fresh [L, E] tensor
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads, op=dist.ReduceOp.SUM)
        loads = loads.cpu()      # one copy per optimizer step (the counts live where the routing runs)
        per_layer = maxvio(loads) if loads.sum() > 0 else torch.zeros(len(self.layers), dtype=torch.float64)
        c = self.cfg
        if c.freeze_after_tokens is not None and tokens_seen >= c.freeze_after_tokens:
            self._frozen = True
        if c.method == "loss_free" and c.bias_update_rate > 0 and not self._frozen and loads.sum() > 0:
            mean = loads.mean(dim=1, keepdim=True)
            if c.bias_update_rule == "sign":
                delta = c.bias_update_rate * torch.sign(mean - loads)
            else:  # linear: proportional to the relative violation
                delta = c.bias_update_rate * (mean - loads) / mean.clamp_min(1e-12)
            for layer, d in zip(self.layers, delta, strict=True):
                bias = layer.gate.e_score_correction_bias
                bias += d.to(bias.device, torch.float32)
                if c.bias_recenter:
                    bias -= bias.mean()
        self._reset(0)
        return {"maxvio_batch": float(per_layer.mean()), "maxvio_batch_layers": per_layer.tolist()}

    @contextlib.contextmanager
    def measure(self):
        """Count loads of evaluation forwards inside the block (for MaxVio_global and the heatmap)."""
        self._reset(1)
        self._measuring = True
        try:
            yield self
        finally:
            self._measuring = False

    def global_stats(self) -> dict:
        loads = self.eval_counts
        if dist.is_available() and dist.is_initialized():     # every rank counted its share of the data
            dist.all_reduce(loads, op=dist.ReduceOp.SUM)
        loads = loads.cpu()
        if not self.layers or loads.sum() == 0:
            return {}
        per_layer = maxvio(loads)
        share = loads / loads.sum(dim=1, keepdim=True)
        return {"maxvio_global": float(per_layer.mean()), "maxvio_global_layers": per_layer.tolist(),
                "expert_share": share.numpy()}
