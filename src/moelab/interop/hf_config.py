"""``config.json`` <-> :class:`~moelab.config.ModelConfig`.

Reads Hugging Face v5 configs (``rope_parameters``) and the hub configs shipped with DeepSeek
checkpoints (``rope_theta`` + ``rope_scaling``, ``scoring_func``, ``topk_method``, ...). Keys missing
from a file take the defaults of the Hugging Face class of its ``model_type``, as transformers would.
Writes what transformers v5 writes, plus the hub-only routing fields so nothing is lost.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from moelab.common.jsonio import read_json
from moelab.common.run_dir_hint import check_not_run_dir
from moelab.config import NOT_IN_CONFIG_JSON, ModelConfig, RopeScaling, make_config, yarn_mscale
from moelab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Defaults of transformers' DeepseekV2Config / DeepseekV3Config (and the hub DeepseekConfig) for
# the fields moelab reads; a config.json that omits a field means these values.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
        initializer_range=0.02, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, rope_interleave=True, attention_bias=False,
        scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0),
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_bias=False,
        first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, n_group=1, n_routed_experts=64,
        n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0,
        topk_group=1, topk_method="greedy", norm_topk_prob=False, v_head_dim=128,
        num_experts_per_tok=6, moe_intermediate_size=1407, scoring_func="softmax", rope_interleave=True),
    "deepseek": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
        num_attention_heads=32, max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
        bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False, attention_bias=False,
        first_k_dense_replace=0, n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None,
        moe_intermediate_size=1407, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        use_mla=False, rope_interleave=False, n_group=1, topk_group=1),
}

_ARCH = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
         "deepseek": "DeepseekForCausalLM"}

# ModelConfig fields config_to_hf does not dump as they are: those config.json never holds (the runtime
# settings), those written below in transformers' form (RoPE, head_dim, num_key_value_heads), and the
# moelab-only scale_only_if_unnormalized and yarn_apply, written only when off their defaults (transformers
# has no such keys).
_NOT_DUMPED = {*NOT_IN_CONFIG_JSON, "rope_scaling", "rope_theta", "head_dim", "num_key_value_heads",
               "scale_only_if_unnormalized", "yarn_apply"}

# Keys in real config.json files that carry no model semantics for moelab.
_IGNORED = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "output_router_logits", "pretraining_tp", "qk_head_dim", "_name_or_path", "tokenizer_class",
    "output_attentions", "output_hidden_states", "return_dict", "num_mtp_layers", "mlp_bias",  # false only
    "attention_dropout", "router_aux_loss_coef", "model_type", "rope_parameters", "rope_scaling",
    "rope_theta", "head_dim", "is_decoder", "problem_type", "id2label", "label2id", "chunk_size_feed_forward",
    "_attn_implementation_autoset", "bos_token", "eos_token",
}


def config_from_hf(raw: dict[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    """Map a Hugging Face / hub ``config.json`` dict to a validated :class:`ModelConfig`."""
    try:
        return _config_from_hf(raw, where, **overrides)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise CheckpointError(f"{where}: malformed value ({type(e).__name__}: {e}); compare it with the "
                              "config.json of a released DeepSeek-V2/V3 checkpoint") from None


def _config_from_hf(raw: dict[str, Any], where: str, **overrides: Any) -> ModelConfig:
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in _HF_DEFAULTS:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not a DeepSeek-style model moelab can load "
            f"(supported: {', '.join(sorted(_HF_DEFAULTS))})")
    if raw.get("quantization_config"):
        q = raw["quantization_config"]
        kind = f"{q.get('quant_method', '?')} {q.get('fmt', '')}".strip() if isinstance(q, dict) else str(q)
        raise CheckpointError(f"{where}: quantised checkpoints are not supported ({kind}); dequantise the "
                              "weights to bf16/fp32 safetensors first")
    values = dict(_HF_DEFAULTS[model_type])
    values["model_type"] = model_type
    fields = set(ModelConfig.model_fields)
    for key, val in raw.items():
        if key in fields:
            values[key] = val
        elif key not in _IGNORED and not key.startswith("_"):
            log.info("%s: ignoring key %r (no meaning for moelab)", where, key)
    if model_type != "deepseek":
        if raw.get("use_mla") is False:
            values["use_mla"] = False
    if model_type == "deepseek_v3":  # transformers' V3 router is always sigmoid + noaux_tc
        values.setdefault("scoring_func", "sigmoid")
    _as_transformers_reads(raw, values, where)
    if values.get("num_key_value_heads") == values.get("num_attention_heads") and values.get("use_mla", True):
        values["num_key_value_heads"] = None
    values["rope_theta"], values["rope_scaling"] = _rope_from_hf(raw, values)
    values.update(overrides)
    cfg = make_config(values, where=where)
    if model_type != "deepseek" and cfg.use_mla:      # (MHA files, e.g. DeepSeek-VL2-tiny's, are not for them)
        for w in hf_compatibility_warnings(cfg):
            log.warning("%s: moelab follows this file where transformers would not: %s", where, w)
    return cfg


def _as_transformers_reads(raw: dict[str, Any], values: dict[str, Any], where: str) -> None:
    """Settings transformers opens without complaint that moelab's own config would refuse, read as
    transformers reads them; and the one key it honours that moelab cannot."""
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias = true (biases on the MLP projections) is not supported by "
                              "moelab's DeepSeek layers; only bias-free feed-forward layers can be loaded")
    layers, dense = values.get("num_hidden_layers"), values.get("first_k_dense_replace")
    if isinstance(layers, int) and isinstance(dense, int) and dense > layers > 0:
        log.info("%s: first_k_dense_replace %d > num_hidden_layers %d: every layer is dense", where, dense, layers)
        values["first_k_dense_replace"] = layers
    vocab = values.get("vocab_size")

    def outside(tok: Any) -> bool:
        return isinstance(vocab, int) and isinstance(tok, int) and not 0 <= tok < vocab

    if isinstance(values.get("eos_token_id"), list):  # several EOS ids: generation stops at the first real one
        ids = values["eos_token_id"]
        values["eos_token_id"] = ([i for i in ids if not outside(i)] or ids or [None])[0]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tok = values.get(key)
        if outside(tok):
            log.warning("%s: %s %d is not a token of this %d-token vocabulary; ignored", where, key, tok, vocab)
            values[key] = None


def _rope_from_hf(raw: dict[str, Any], values: dict[str, Any]) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"config.json: rope_parameters/rope_scaling must be an object (got {params!r})")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = next(iter(params.values()))  # per-layer-type form: one entry for all layers here
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported (only default RoPE and yarn)")
    orig = params.get("original_max_position_embeddings", values.get("max_position_embeddings"))
    factor = params.get("factor") or values["max_position_embeddings"] / orig
    scaling = {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(orig),
               "beta_fast": float(params.get("beta_fast") or 32), "beta_slow": float(params.get("beta_slow") or 1),
               "mscale": float(params.get("mscale") if params.get("mscale") is not None else 1.0),
               "mscale_all_dim": float(params.get("mscale_all_dim") or 0.0),
               "truncate": bool(params.get("truncate", True))}
    own = RopeScaling(**scaling).cos_sin_factor         # moelab's (the hub code's) rule
    if params.get("attention_factor") is not None:
        # kept only where it says something the mscale keys do not (moelab writes it where transformers'
        # rule would miss moelab's factor: read back, the config is the one that was saved)
        if not math.isclose(float(params["attention_factor"]), own, rel_tol=1e-9):
            scaling["attention_factor"] = float(params["attention_factor"])
    elif values["model_type"] != "deepseek":
        # transformers reads cos/sin's factor as mscale(s, mscale)/mscale(s, mscale_all_dim) only when both
        # are given and non-zero, else mscale(s); the hub code (moelab's rule) defaults them to 1 and 0.
        # Where the two differ the file means what transformers computes: keep that factor, and say so.
        hf = _hf_cos_sin_factor(scaling["factor"], params.get("mscale"), params.get("mscale_all_dim"))
        if not math.isclose(hf, own, rel_tol=1e-12):
            scaling["attention_factor"] = hf
            log.warning("config.json: YaRN mscale %s with mscale_all_dim %s: transformers scales cos/sin by "
                        "%.4f, the hub code by %.4f; moelab follows transformers (write attention_factor to choose)",
                        params.get("mscale"), params.get("mscale_all_dim"), hf, own)
    return theta, scaling


def _hf_cos_sin_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    """transformers' YaRN cos/sin factor for a config without ``attention_factor``."""
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def _rope_to_hf(rs: RopeScaling) -> dict[str, Any]:
    """YaRN as transformers' ``rope_parameters`` reads it back to the same tables: ``attention_factor``
    written where transformers' rule would not find moelab's cos/sin factor, ``truncate`` when off."""
    rope = {"rope_type": "yarn", "factor": rs.factor, "original_max_position_embeddings":
            rs.original_max_position_embeddings, "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
            "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim}
    if rs.attention_factor is not None or not math.isclose(
            _hf_cos_sin_factor(rs.factor, rs.mscale, rs.mscale_all_dim), rs.cos_sin_factor, rel_tol=1e-12):
        rope["attention_factor"] = rs.cos_sin_factor
    if not rs.truncate:
        rope["truncate"] = False
    return rope


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict transformers v5 would write for this model (plus hub routing fields)."""
    d = cfg.model_dump(exclude=_NOT_DUMPED)
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = {"rope_theta": cfg.rope_theta, **_rope_to_hf(cfg.rope_scaling)}
    d.update(
        model_type=cfg.hf_model_type,
        architectures=[_ARCH[cfg.hf_model_type]],
        num_key_value_heads=cfg.kv_heads,
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,
        torch_dtype=torch_dtype,
        use_cache=True,
    )
    # transformers rejects nulls here and builds MoE layers from first_k_dense_replace on
    d.update(n_shared_experts=cfg.n_shared_experts or 0, n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1)
    if not cfg.is_moe:
        d.update(first_k_dense_replace=cfg.num_hidden_layers, n_routed_experts=0, n_shared_experts=0,
                 num_experts_per_tok=0)
    if not cfg.use_mla:
        d["head_dim"] = cfg.attn_head_dim
    if cfg.hf_model_type == "deepseek":  # the hub DeepSeekMoE code reads rope_scaling, not rope_parameters
        rs = cfg.rope_scaling           # the newer keys only when set, as older code would not know them
        d["rope_scaling"] = None if rs is None else rs.model_dump(
            exclude={k for k, off in (("attention_factor", None), ("truncate", True)) if getattr(rs, k) == off})
        d.pop("rope_parameters")
    if cfg.scale_only_if_unnormalized:
        d["scale_only_if_unnormalized"] = True
    if cfg.yarn_apply != "always":       # the reference code's rule; transformers always applies YaRN
        d["yarn_apply"] = cfg.yarn_apply
    return d


def hf_compatibility_warnings(cfg: ModelConfig) -> list[str]:
    """Ways in which transformers' own class for ``cfg.hf_model_type`` would compute something else."""
    w = []
    if cfg.hf_model_type == "deepseek_v3" and (cfg.scoring_func != "sigmoid" or
                                           (cfg.topk_method != "noaux_tc" and (cfg.n_group or 1) > 1)):
        w.append("transformers' DeepseekV3 router is always sigmoid + noaux_tc; this model's router "
                 f"({cfg.scoring_func}, {cfg.topk_method}) will not be reproduced there")
    if cfg.hf_model_type == "deepseek_v2" and (cfg.scoring_func != "softmax" or cfg.topk_method == "noaux_tc"):
        w.append("transformers' DeepseekV2 router is softmax greedy/group-limited without a bias")
    if cfg.hf_model_type == "deepseek_v2" and cfg.norm_topk_prob:
        w.append("transformers' DeepseekV2 router ignores norm_topk_prob (never renormalises)")
    if not cfg.use_mla and cfg.hf_model_type != "deepseek":
        w.append("transformers' DeepseekV2/V3 classes have no MHA variant (use_mla=false)")
    if cfg.moe_layer_freq > 1 and cfg.hf_model_type != "deepseek":
        w.append(f"transformers ignores moe_layer_freq ({cfg.moe_layer_freq}): it would make every layer from "
                 "first_k_dense_replace on an MoE layer")
    if cfg.hf_model_type == "deepseek_v2" and not cfg.rope_interleave and cfg.use_mla:
        w.append("transformers' DeepseekV2 always rotates interleaved pairs; this model rotates halves "
                 "(rope_interleave=false)")
    if (cfg.hf_model_type == "deepseek_v3" and cfg.is_moe and cfg.scale_only_if_unnormalized and cfg.norm_topk_prob
            and cfg.num_experts_per_tok > 1 and cfg.routed_scaling_factor != 1.0):
        w.append("transformers' DeepseekV3 scales the renormalised gates by routed_scaling_factor; this model "
                 "does not (scale_only_if_unnormalized)")
    if (cfg.rope_scaling is not None and cfg.rope_scaling.factor > 1.0 and not cfg.yarn_active
            and cfg.hf_model_type != "deepseek"):
        w.append("transformers applies YaRN whenever rope_scaling is set; this model does not (yarn_apply = "
                 "'when_longer' and max_position_embeddings <= original_max_position_embeddings)")
    if cfg.hf_model_type == "deepseek":
        w.append("model_type 'deepseek' (DeepSeekMoE) is opened by the hub code, not transformers itself")
    return w


def read_config_json(directory: Path, **overrides: Any) -> ModelConfig:
    check_not_run_dir(directory)
    path = directory / "config.json"
    raw = read_json(path, CheckpointError, missing=f"{directory} has no config.json; a checkpoint directory needs "
                    "config.json plus model.safetensors (or sharded safetensors with an index)")
    return config_from_hf(raw, where=str(path), **overrides)
