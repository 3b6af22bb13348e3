"""The typed model configuration: :class:`ModelConfig` (architecture fields + runtime settings), strict.

Field names follow Hugging Face's ``DeepseekV2Config`` / ``DeepseekV3Config`` (and the hub
``config.json`` files shipped with DeepSeek checkpoints), so a ``config.json`` maps one-to-one
(see :mod:`moelab.interop.hf_config`). A few fields are moelab settings that the papers or the
implementations leave open; each is documented below with its default. Of these, the runtime
settings (:data:`RUNTIME_FIELDS`) say how the model computes, not what it is.

A TOML config holds the model under ``[model]`` (later stages add their own sections)::

    [model]
    vocab_size = 512
    hidden_size = 128
    ...
    [model.rope_scaling]
    type = "yarn"
    factor = 4.0
    original_max_position_embeddings = 256
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, PlainValidator, field_validator, model_validator

ScoringFunc = Literal["softmax", "sigmoid"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


class _Strict(BaseModel):
    # allow_inf_nan=False: a float setting must be finite (nan / inf is refused, naming the key)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class RopeScaling(_Strict):
    """YaRN context extension (docs/methods.md §4). Applies to the RoPE dimensions only.

    ``mscale`` scales cos/sin by ``mscale(s, mscale)/mscale(s, mscale_all_dim)`` unless ``attention_factor``
    gives that factor outright (transformers' key); ``mscale_all_dim`` scales the softmax by
    ``mscale(s, mscale_all_dim)**2``. ``truncate = false`` keeps the ramp's bounds unrounded (transformers'
    key; the reference floors/ceils them).
    """

    type: Literal["yarn"] = "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def cos_sin_factor(self) -> float:
        """The factor on cos/sin: ``attention_factor``, else ``mscale(s, mscale)/mscale(s, mscale_all_dim)``."""
        if self.attention_factor is not None:
            return self.attention_factor
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ValueError(f"rope_scaling.attention_factor must be positive (got {self.attention_factor})")
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1 (got {self.factor}); YaRN only extends context")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be positive")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"rope_scaling.beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow}): "
                "beta_fast bounds the dimensions kept as-is, beta_slow those fully interpolated"
            )
        return self


class ModelConfig(_Strict):
    """A DeepSeek-style decoder: DeepSeekMoE feed-forward layers and MLA (or MHA/GQA) attention.

    Sizes default to DeepSeek-V3's; routing defaults to plain sigmoid top-k with the loss-free bias
    (one group, no dense layers, scale 1.0). Loading a ``config.json`` fills missing keys with the
    defaults of the Hugging Face class of its ``model_type`` instead (moelab.interop.hf_config).
    """

    #: Hugging Face model type written on export: deepseek_v3 (sigmoid/noaux_tc routers), deepseek_v2
    #: (softmax, greedy or group-limited), deepseek (hub DeepSeekMoE: MHA, Llama-style RoPE).
    #: None = derived from the router and attention (see ``hf_model_type``).
    model_type: Literal["deepseek_v3", "deepseek_v2", "deepseek"] | None = None
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # width of the dense SwiGLU layers
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MHA/GQA only; None = num_attention_heads
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None

    # --- DeepSeekMoE (docs/methods.md §1) --------------------------------------------------------
    n_routed_experts: int | None = 256  # None or 0: a dense model
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    moe_intermediate_size: int = 2048
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1

    # --- routing (docs/methods.md §2) ------------------------------------------------------------
    scoring_func: ScoringFunc = "sigmoid"
    topk_method: TopkMethod = "noaux_tc"
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    #: moelab setting. HF V3 (our default) always multiplies by routed_scaling_factor; the hub V2
    #: code does so only when the top-k weights were not renormalised. True reproduces hub V2.
    scale_only_if_unnormalized: bool = False
    # Hub-only fields, kept for the balancing stage and for round trips; the model ignores them.
    aux_loss_alpha: float = 0.0
    seq_aux: bool = False
    ep_size: int = 1
    num_nextn_predict_layers: int = 0  # V3 multi-token-prediction layers are not built (skipped on load)

    # --- attention (docs/methods.md §4) ----------------------------------------------------------
    use_mla: bool = True  # False: plain MHA/GQA (dense baselines, DeepSeek-VL2-Tiny, DeepSeekMoE)
    #: None (or 0, since TOML has no null): q_proj straight from the hidden state, as in V2-Lite.
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    head_dim: int | None = None  # MHA/GQA only; None = hidden_size // num_attention_heads
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    #: Checkpoints rotate interleaved pairs (x0,x1),(x2,x3)...; False rotates halves (Llama style).
    rope_interleave: bool = True
    #: Runtime setting (RUNTIME_FIELDS): "naive" materialises per-head K/V, "absorb" attends against
    #: the latent, "auto" uses naive for multi-token forwards (training, prefill) and absorb for decode.
    attn_impl: Literal["auto", "absorb", "naive"] = "auto"
    #: moelab setting, [UNCERTAIN] in the sources: HF and hub code apply YaRN whenever it is
    #: configured ("always"); the reference code only when max_position_embeddings exceeds the
    #: original length ("when_longer"). Written to config.json only when "when_longer".
    yarn_apply: Literal["always", "when_longer"] = "always"
    #: Runtime setting (RUNTIME_FIELDS): which kernel computes the routed experts (see
    #: moelab.model.experts.choose_kernel). "fused" is the fastest and leanest on one device; "loop" is
    #: the reference the others are tested against.
    expert_impl: Literal["loop", "grouped_mm", "padded_bmm", "fused"] = "fused"
    #: Runtime setting (RUNTIME_FIELDS): torch.compile the elementwise activation math of the "fused"
    #: kernel (forward and backward). About 4x faster elementwise work for a one-time compile of ~20-40 s
    #: per shape; needs a C++ compiler. Off by default (tests and short runs).
    compile_experts: bool = False

    # ---------------------------------------------------------------------------------------
    @field_validator("q_lora_rank", "num_key_value_heads", "head_dim", "n_group", "topk_group", mode="before")
    @classmethod
    def _zero_is_none(cls, v):
        return None if v == 0 else v

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data):
        # pydantic's lax mode would read `num_hidden_layers = true` as 1
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation is not bool:
                    raise ValueError(f"{key} must be a number, not a boolean (got {value})")
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        problems: list[str] = []
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "moe_layer_freq"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.intermediate_size <= 0 and self.first_k_dense_replace > 0:
            problems.append("intermediate_size must be positive when there are dense layers")
        for name in ("first_k_dense_replace", "n_shared_experts", "n_routed_experts", "rms_norm_eps",
                     "initializer_range"):
            v = getattr(self, name)
            if v is not None and v < 0:
                problems.append(f"{name} must not be negative (got {v})")
        if self.first_k_dense_replace > self.num_hidden_layers:
            problems.append(
                f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers})")
        for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, tok)
            if v is not None and not 0 <= v < self.vocab_size:
                problems.append(f"{tok} ({v}) must lie in [0, vocab_size={self.vocab_size})")
        if self.is_moe:
            problems += self._check_moe()
        problems += self._check_attention()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _check_moe(self) -> list[str]:
        p: list[str] = []
        E, K = self.n_routed_experts or 0, self.num_experts_per_tok
        if K is None or K <= 0:
            return [f"num_experts_per_tok must be a positive integer for an MoE model (got {K})"]
        if self.moe_intermediate_size <= 0:
            p.append(f"moe_intermediate_size must be positive (got {self.moe_intermediate_size})")
        if K > E:
            p.append(f"num_experts_per_tok ({K}) is larger than n_routed_experts ({E}): top-k cannot "
                     "pick more experts than exist")
        if self.routed_scaling_factor <= 0:
            p.append(f"routed_scaling_factor must be positive (got {self.routed_scaling_factor})")
        if self.topk_method == "greedy":
            return p
        G, TG = self.n_group or 1, self.topk_group or 1
        if G <= 0 or TG <= 0:
            return p + [f"n_group ({G}) and topk_group ({TG}) must be positive"]
        if E % G:
            p.append(f"n_group ({G}) does not divide n_routed_experts ({E}): groups must be equal in size")
            return p
        if TG > G:
            p.append(f"topk_group ({TG}) is larger than n_group ({G}): cannot keep more groups than exist")
        elif K > TG * (E // G):
            p.append(f"num_experts_per_tok ({K}) exceeds the experts in the kept groups "
                     f"(topk_group {TG} x {E // G} experts per group)")
        if self.topk_method == "noaux_tc" and E // G < 2:
            p.append(f"topk_method 'noaux_tc' scores a group by its top-2 experts, so each group needs >= 2 "
                     f"experts (n_routed_experts {E} / n_group {G} = {E // G})")
        return p

    def _check_attention(self) -> list[str]:
        p: list[str] = []
        if self.use_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    p.append(f"{name} must be positive (got {getattr(self, name)})")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                p.append(f"q_lora_rank must be positive or null (got {self.q_lora_rank})")
            if self.qk_rope_head_dim % 2:
                p.append(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: RoPE rotates pairs")
        elif self.num_attention_heads > 0:
            kv = self.num_key_value_heads or self.num_attention_heads
            if self.head_dim is not None and self.head_dim <= 0:
                p.append(f"head_dim must be positive (got {self.head_dim})")
                return p
            if kv <= 0 or self.num_attention_heads % kv:
                p.append(f"num_key_value_heads ({kv}) must divide num_attention_heads "
                         f"({self.num_attention_heads})")
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                p.append(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                         f"({self.num_attention_heads}); set head_dim explicitly")
            if self.attn_head_dim % 2:
                p.append(f"head_dim ({self.attn_head_dim}) must be even: RoPE rotates pairs")
        return p

    # --- derived quantities -----------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, idx: int) -> bool:
        """Layer ``idx`` uses DeepSeekMoE (else a dense SwiGLU), as in the hub code."""
        return self.is_moe and idx >= self.first_k_dense_replace and idx % self.moe_layer_freq == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def hf_model_type(self) -> str:
        """The Hugging Face ``model_type`` to export as (explicit, or the closest match)."""
        if self.model_type:
            return self.model_type
        if not self.use_mla:
            return "deepseek"
        if self.is_moe and (self.scoring_func == "sigmoid" or self.topk_method == "noaux_tc"):
            return "deepseek_v3"
        return "deepseek_v2"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_head_dim(self) -> int:
        """Head size of MHA/GQA attention."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head."""
        return self.qk_rope_head_dim if self.use_mla else self.attn_head_dim

    @property
    def yarn_active(self) -> bool:
        rs = self.rope_scaling
        if rs is None or rs.factor <= 1.0:
            return False
        if self.yarn_apply == "when_longer":
            return self.max_position_embeddings > rs.original_max_position_embeddings
        return True

    @property
    def softmax_scale(self) -> float:
        """``d_qk^-0.5``, times ``mscale(s, mscale_all_dim)**2`` under YaRN (docs/methods.md §4)."""
        d = self.qk_head_dim if self.use_mla else self.attn_head_dim
        scale = d**-0.5
        if self.yarn_active and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def cache_elems_per_token(self) -> int:
        """Decoding-cache values per token over all layers (latent + RoPE key for MLA)."""
        if self.use_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers
        return 2 * self.kv_heads * self.attn_head_dim * self.num_hidden_layers

    def mha_cache_elems_per_token(self) -> int:
        """What a naive/MHA cache of the same attention would hold: per-head K and V per layer."""
        if self.use_mla:
            return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * self.num_hidden_layers
        return 2 * self.num_attention_heads * self.attn_head_dim * self.num_hidden_layers


#: Runtime settings: how the model computes, not what it is (the same function up to rounding). Never
#: written to config.json (a reloaded checkpoint gets the defaults); may differ from a checkpoint's, as in
#: ``moelab.load(path, expert_impl="loop")`` or a run's ``[model]`` over ``train.init_from``.
RUNTIME_FIELDS: tuple[str, ...] = ("attn_impl", "expert_impl", "compile_experts")


def _compile_scope(v: object) -> bool | str:
    if isinstance(v, bool) or v == "dense":
        return v
    if v == "blocks":                       # the same as true (one spelling in records, no false contradictions)
        return True
    raise ValueError(f'give false, true (= "blocks": whole decoder blocks) or "dense" (their dense parts only), '
                     f"not {v!r}")


#: ``train.compile``: False, True / "blocks" (torch.compile whole decoder blocks; read as True) or "dense"
#: (their dense parts only: attention, norms, dense and shared MLPs) — moelab.train.compile
CompileScope = Annotated[bool | Literal["blocks", "dense"], PlainValidator(_compile_scope)]


class RuntimeSettings(_Strict):
    """The ``[runtime]`` section of a run config: how to compute, never what — kernels, attention path and
    the compile switches, in one place (``None``: keep the value of ``[model]`` / ``[train]`` or the
    checkpoint's default). ``compile`` is ``train.compile`` (whole blocks or their dense parts); ``compile_experts``
    the fused expert kernel's elementwise math. A key given both here and in ``[model]``/``[train]``
    with different values is an error."""

    expert_impl: Literal["loop", "grouped_mm", "padded_bmm", "fused"] | None = None
    attn_impl: Literal["auto", "absorb", "naive"] | None = None
    compile_experts: bool | None = None
    compile: CompileScope | None = None

    def model_settings(self) -> dict[str, Any]:
        """The given settings that belong to the model (``RUNTIME_FIELDS``)."""
        return {k: getattr(self, k) for k in RUNTIME_FIELDS if getattr(self, k) is not None}


#: Never in config.json: the runtime settings. (yarn_apply changes the numbers, so it is written, but only
#: when it is "when_longer": transformers and the hub configs have no key for it and always apply YaRN.)
NOT_IN_CONFIG_JSON: tuple[str, ...] = RUNTIME_FIELDS


def runtime_settings(cfg: ModelConfig) -> dict[str, Any]:
    """The runtime settings of ``cfg`` by name (e.g. ``moelab.load(path, **runtime_settings(cfg))``)."""
    return {name: getattr(cfg, name) for name in RUNTIME_FIELDS}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature factor ``0.1·m·ln(s) + 1`` (1 when s <= 1)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0
