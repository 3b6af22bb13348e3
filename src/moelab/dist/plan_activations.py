"""Activation memory of one training micro-batch, per rank: what autograd keeps from the forward for the
backward, layer by layer, as moelab's model computes it (read off the code and checked against measurement
on the CPU in ``tests/dist/test_plan_measured.py``).

Legend: T = B·L tokens of the micro-batch on this rank, h hidden, a bytes of the compute dtype (2 for bf16,
4 for fp32), r bytes of the residual stream (4 under bf16-mixed: the fp32 embedding plus bf16 branches
promotes to fp32; 2 in pure bf16), N heads, P/R/V MLA's nope/rope/value head dims, C ``kv_lora_rank``,
Q ``q_lora_rank``, D the MHA head size, E routed experts, K experts per token, G/M ``n_group``/``topk_group``,
I the expert width, F the dense width, F_s = n_shared·I, V vocabulary. All numbers are bytes per token:

    norm(d, b)   = (4 + b)·d + 4     RMSNorm in fp32: an fp32 copy of the input (the input itself when it is
                                     fp32), the normalised values in the input's dtype b, the fp32 1/rms
    copies(c, d) = a·d               when the norm's output already has the compute dtype (fp32; pure bf16),
                 = c·a·d             under bf16-mixed: its output is fp32 (fp32 norm weights) and each of the
                                     c linear layers reading it saves its own bf16 cast (autocast)

    attention    = norm(h, r) + copies(c_attn, h) + core        c_attn = 2 (MLA: q, kv_a), 3 (MHA: q, k, v)
      MLA q path = norm(Q, a) + a·Q                             q_a_layernorm, q_b_proj's input (0 if Q = 0)
      MLA latent = norm(C, a) + a·C                             kv_a_layernorm, kv_b_proj's input; in uniform
                                                                precision kv_b_proj's input is a view of
                                                                [c_KV | k_pe] (+ a·R), in fp32 so is the
                                                                norm's input (+ a·R more)
      core, fused kernel (flash / memory-efficient SDPA, the GPU path): q, k, v, out and the fp32 logsumexp
          MLA  a·(2·N(P+R) + N(P+V) + N·V) + 4N   (v is a view of kv_b_proj's [T, N(P+V)] output)
          MHA  a·4·N·D + 4N
        plus, per layer and micro-batch (not per token), the additive mask SDPA makes of moelab's boolean
        causal mask, a·L² (an explicit mask rules out the is_causal path)
      core, math kernel (unfused SDPA, what the CPU runs; fp32 even under autocast): q, kᵀ, v, the
          L attention probabilities of each head, the output: 4·(2·N·d_qk + N·L + 2·N·d_v)
    mlp          = norm(h, r) + copies(c_mlp, h) + ffn           c_mlp = 2 (SwiGLU or shared experts: gate, up)
                                                                 + 1 for the fused experts' input
      dense      = 4·a·F                                         gate and up outputs, silu(gate), the product
      MoE        = router + routed + shared
        router   = 4h (its fp32 input, unless that is the shared fp32 copy) + 4E (scores) + 12K + 4
                   + 17G + 8M (noaux_tc group scores; 5G + 8M group_limited_greedy; none when G = 1)
        routed   = 8K + K·λ·slot       λ = load factor of the busiest rank (1: uniform routing)
          slot, fused kernel   = 2I·a + 12           only the gate/up pre-activations (+ token id, gate)
          slot, grouped kernel = (2h + 4I)·a + 20    dispatched rows, gate/up, silu, product, expert output
                                                     (the modular path expert parallelism uses)
        shared   = 4·a·F_s
    head         = 8 (token ids) + norm(h, r) + a·h + 4V        final norm, lm_head's input, fp32 log-probs

Saved for backward without checkpointing: T·(Σ_layers (attention + mlp) + head) (+ the mask terms).
With activation checkpointing each block keeps only its input, r·h per token, and is recomputed in the
backward: T·(n_layers·r·h + head) at the end of the forward, one block's activations more while it is
recomputed.

Working memory on top (the peak is not the saved set alone):

    loss     = 8V      at the start of the backward: the fp32 gradients of the log-probs and of the logits
    backward = per token, the gradients in flight inside one block's backward: the larger of
               feed-forward   fused experts K·λ·(3h + 4I)·a + 4·a·h, grouped K·λ·(h + 2I)·a + 2·a·h,
                              dense SwiGLU 3·a·F
               attention      fused a·N·(2·d_qk + 3·d_v), math 8·N·L + 4·N·(d_qk + d_v)

:func:`step_peak` walks the step's phases: the loss (all saved activations + loss working memory), then
each block's backward from the last (the activations of the blocks before it + its own saved activations +
the larger of its feed-forward's working memory and its attention's less the feed-forward's freed
activations + the gradients written so far; with checkpointing: the inputs of the blocks before it + its
recomputed activations + working memory + gradients), then the finished backward (all gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moelab.config import ModelConfig

AttentionKernel = Literal["fused", "math"]
ExpertKernel = Literal["fused", "grouped"]


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state under one training precision."""

    name: str
    param: int      # stored (sharded) parameters: fp32 masters, or bf16 weights
    grad: int       # stored (sharded) gradients
    moment: int     # each of AdamW's two moments
    compute: int    # activations, all-gathered weights, all-to-all payload
    residual: int   # the residual stream between blocks
    reduce: int     # gradient reduce-scatter element

    @property
    def mixed(self) -> bool:
        """Compute dtype differs from the stored weights' (autocast casts per consumer)."""
        return self.compute != self.param


#: bf16-mixed: fp32 master weights, gradients and moments, bf16 compute, fp32 gradient reduction
#: (train.dtype = bfloat16, train.weights_dtype = float32). bf16: everything bf16 (train.weights_dtype =
#: bfloat16). fp32: everything fp32 (train.dtype = float32).
PRECISIONS: dict[str, Precision] = {
    "bf16-mixed": Precision("bf16-mixed", param=4, grad=4, moment=4, compute=2, residual=4, reduce=4),
    "bf16": Precision("bf16", param=2, grad=2, moment=2, compute=2, residual=2, reduce=2),
    "fp32": Precision("fp32", param=4, grad=4, moment=4, compute=4, residual=4, reduce=4),
}


def _norm(width: int, in_bytes: int) -> int:
    return (4 + in_bytes) * width + 4


def _copies(p: Precision, consumers: int, width: int) -> int:
    return consumers * p.compute * width if p.mixed else p.compute * width


def attention_bytes(cfg: ModelConfig, p: Precision, seq_len: int, kernel: AttentionKernel = "fused"
                    ) -> dict[str, int]:
    """Per token: the attention block's saved tensors, by part (norm, inputs, projections, core)."""
    a, h, N = p.compute, cfg.hidden_size, cfg.num_attention_heads
    out = {"norm": _norm(h, p.residual)}
    if cfg.use_mla:
        P, R, Vd, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        Q = cfg.q_lora_rank or 0
        out["inputs"] = _copies(p, 2, h)
        latent = _norm(C, a) + a * C
        if not p.mixed:
            latent += 2 * a * R if a == 4 else a * R     # fp32: the norm's input is the [C+R] view too
        out["projections"] = (_norm(Q, a) + a * Q if Q else 0) + latent
        if kernel == "fused":
            out["core"] = a * (2 * N * (P + R) + N * (P + Vd) + N * Vd) + 4 * N
        else:
            out["core"] = 4 * (2 * N * (P + R) + N * seq_len + 2 * N * Vd)
    else:
        D = cfg.attn_head_dim
        out["inputs"] = _copies(p, 3, h)
        out["projections"] = 0
        out["core"] = a * 4 * N * D + 4 * N if kernel == "fused" else 4 * (4 * N * D + N * seq_len)
    return out


def mask_bytes_per_layer(p: Precision, seq_len: int, kernel: AttentionKernel = "fused") -> int:
    """Per layer and micro-batch: the additive mask the fused SDPA kernels keep (a·L²); math keeps none."""
    return p.compute * seq_len * seq_len if kernel == "fused" else 0


def mlp_bytes(cfg: ModelConfig, p: Precision, moe: bool, expert_kernel: ExpertKernel = "fused",
              load: float = 1.0) -> dict[str, float]:
    """Per token: the feed-forward block's saved tensors (dense SwiGLU, or router + routed + shared)."""
    a, h = p.compute, cfg.hidden_size
    out: dict[str, float] = {"norm": _norm(h, p.residual)}
    if not moe:
        out["inputs"] = _copies(p, 2, h)
        out["dense"] = 4 * a * cfg.intermediate_size
        return out
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    F_s = (cfg.n_shared_experts or 0) * I
    consumers = (2 if F_s else 0) + (1 if expert_kernel == "fused" else 0)
    out["inputs"] = _copies(p, consumers, h) if consumers else 0
    G, M = cfg.n_group or 1, cfg.topk_group or 1
    groups = 0
    if G > 1 and cfg.topk_method != "greedy":
        groups = (17 * G if cfg.topk_method == "noaux_tc" else 5 * G) + 8 * M
    fp32_input_shared = p.compute == 4 and p.param == 4 and consumers
    out["router"] = (0 if fp32_input_shared else 4 * h) + 4 * E + 12 * K + 4 + groups
    slot = 2 * I * a + 12 if expert_kernel == "fused" else (2 * h + 4 * I) * a + 20
    out["routed"] = 8 * K + K * load * slot
    out["shared"] = 4 * a * F_s
    return out


def head_bytes(cfg: ModelConfig, p: Precision) -> dict[str, int]:
    """Per token: token ids, the final norm, lm_head's input and the fp32 log-probs of the loss."""
    h = cfg.hidden_size
    return {"embedding": 8, "norm": _norm(h, p.residual), "lm_head": p.compute * h, "log_probs": 4 * cfg.vocab_size}


def loss_working_bytes(cfg: ModelConfig) -> int:
    """Per token: the fp32 gradients of the log-probs and of the logits at the start of the backward."""
    return 8 * cfg.vocab_size


def backward_working_bytes(cfg: ModelConfig, p: Precision, moe: bool, seq_len: int,
                           attention: AttentionKernel = "fused", expert_kernel: ExpertKernel = "fused",
                           load: float = 1.0) -> tuple[float, float]:
    """Per token: the gradients in flight inside one block's backward beyond what it saved, as (feed-forward,
    attention); they run one after the other, the attention's once the feed-forward's activations are freed."""
    a, h, N = p.compute, cfg.hidden_size, cfg.num_attention_heads
    if cfg.use_mla:
        d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.attn_head_dim
    if attention == "fused":
        attn = a * N * (2 * d_qk + 3 * d_v)
    else:
        attn = 8 * N * seq_len + 4 * N * (d_qk + d_v)
    if not moe:
        return 3 * a * cfg.intermediate_size, attn
    K, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    if expert_kernel == "fused":
        ffn = K * load * (3 * h + 4 * I) * a + 4 * a * h
    else:
        ffn = K * load * (h + 2 * I) * a + 2 * a * h
    return ffn, attn


@dataclass
class ActivationBytes:
    """Activation memory of one micro-batch on one rank, in bytes, by layer (the plan's phase sweep combines
    it with the gradients that build up during the backward, :func:`moelab.dist.plan.plan`)."""

    layer_saved: list[float]      # per decoder layer: saved for the backward (no checkpointing), mask included
    layer_working: list[float]    # per decoder layer: gradients in flight during its backward
    layer_input: float            # per decoder layer: the block input activation checkpointing keeps
    head: float                   # token ids, final norm, lm_head input, log-probs
    ids: float                    # the token ids alone (kept until the embedding's backward)
    loss: float                   # the loss's working memory at the start of the backward
    breakdown: dict[str, float]   # saved, by part, summed over layers (no checkpointing)

    @property
    def saved(self) -> float:
        """Kept for the backward at the end of the forward, without checkpointing."""
        return sum(self.layer_saved) + self.head

    @property
    def saved_ckpt(self) -> float:
        """Kept at the end of the forward with activation checkpointing: block inputs and the head."""
        return len(self.layer_saved) * self.layer_input + self.head


def activation_bytes(cfg: ModelConfig, p: Precision, seq_len: int, micro_batch: int,
                     attention: AttentionKernel = "fused", expert_kernel: ExpertKernel = "fused",
                     load: float = 1.0) -> ActivationBytes:
    """Saved and working activation bytes of a micro-batch of ``micro_batch × seq_len`` tokens (formulas above)."""
    T = micro_batch * seq_len
    moe_ids = set(cfg.moe_layer_ids)
    kinds = [i in moe_ids for i in range(cfg.num_hidden_layers)]
    att = attention_bytes(cfg, p, seq_len, attention)
    mask = mask_bytes_per_layer(p, seq_len, attention) if micro_batch > 0 else 0
    per_token: dict[bool, float] = {}
    working: dict[bool, float] = {}
    parts: dict[str, float] = {}
    names = {"norm": "norms", "inputs": "layer inputs (casts)", "dense": "dense MLP", "routed": "routed experts",
             "shared": "shared experts"}
    for moe in set(kinds):
        mlp = mlp_bytes(cfg, p, moe, expert_kernel, load)
        per_token[moe] = sum(att.values()) + sum(mlp.values())
        ffn, attn = backward_working_bytes(cfg, p, moe, seq_len, attention, expert_kernel, load)
        working[moe] = T * max(ffn, attn - sum(mlp.values()))
        n = kinds.count(moe)
        for name, v in mlp.items():
            parts[names.get(name, name)] = parts.get(names.get(name, name), 0) + n * T * v
    L = len(kinds)
    parts["norms"] = parts.get("norms", 0) + L * T * att["norm"]
    parts["layer inputs (casts)"] = parts.get("layer inputs (casts)", 0) + L * T * att["inputs"]
    parts["attention"] = L * (T * (att["projections"] + att["core"]) + mask)
    head = head_bytes(cfg, p)
    parts["logits and head"] = T * sum(head.values())
    return ActivationBytes(
        layer_saved=[T * per_token[m] + mask for m in kinds], layer_working=[working[m] for m in kinds],
        layer_input=T * p.residual * cfg.hidden_size, head=T * sum(head.values()), ids=T * head["embedding"],
        loss=T * loss_working_bytes(cfg), breakdown={k: v for k, v in parts.items() if v})


def step_peak(acts: ActivationBytes, layer_grads: list[float], head_grads: float, all_grads: float,
              checkpointing: bool) -> float:
    """The largest activation + gradient memory of one step, phase by phase (weights and optimizer states
    excluded): the loss at the end of the forward; each block's backward, last to first, with the gradients of
    the blocks after it (and its own) already written and the activations of the blocks after it freed; the
    finished backward holding every gradient."""
    L = len(acts.layer_saved)
    peak = (acts.saved_ckpt if checkpointing else acts.saved) + acts.loss
    grads = head_grads
    kept = sum(acts.layer_saved)
    for l in reversed(range(L)):
        grads += layer_grads[l]
        if checkpointing:
            live = (l + 1) * acts.layer_input + acts.layer_saved[l]
        else:
            live = kept
            kept -= acts.layer_saved[l]
        peak = max(peak, acts.ids + live + acts.layer_working[l] + grads)
    return max(peak, all_grads)
