"""Parameter, cache and FLOP accounting for a config, without allocating weights (meta device).

* total parameters (tied embeddings counted once);
* activated parameters per token: everything except routed experts, plus K/E of each MoE layer's
  routed experts (input embedding and LM head included, as the DeepSeek papers count them);
* decoding-cache values per token: MLA latent + RoPE key vs the per-head K/V an MHA cache holds
  (docs/methods.md §4, Table 1 of DeepSeek-V2);
* non-embedding FLOPs per token, DeepSeek LLM's ``M = 72·L·d² + 12·L·d·l_seq`` (docs/methods.md §10),
  and the MoE-aware ``6·N_active_non_embedding + 12·L·d·l_seq``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moelab.config import ModelConfig
from moelab.errors import ConfigError


@dataclass
class ModelBudget:
    total_params: int
    activated_params: int
    embedding_params: int          # input embedding + LM head (once if tied)
    routed_expert_params: int
    activated_routed_expert_params: int
    moe_layers: int
    dense_layers: int
    cache_elems_per_token: int     # decoding cache over all layers
    mha_cache_elems_per_token: int  # what per-head K and V would need
    cache_bytes_per_token: int     # at cache_dtype
    mha_cache_bytes_per_token: int
    cache_dtype: str
    seq_len: int
    flops_per_token: float         # 72·L·d² + 12·L·d·l_seq (DeepSeek LLM formula)
    flops_per_token_active: float  # 6·N_active_non_embedding + 12·L·d·l_seq

    def as_dict(self) -> dict:
        return asdict(self)


def model_budget(cfg: ModelConfig, seq_len: int | None = None, cache_dtype: torch.dtype = torch.bfloat16
                 ) -> ModelBudget:
    from moelab.model.transformer import DeepSeekForCausalLM

    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    total = routed = embed = 0
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        n = p.numel()
        total += n
        if ".mlp.experts." in name:
            routed += n
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            embed += n
    K, E = cfg.num_experts_per_tok or 0, cfg.n_routed_experts or 0
    act_routed = routed * K // E if E else 0
    activated = total - routed + act_routed
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    l_seq = seq_len or pretraining_context(cfg)
    attn_flops = 12 * L * d * l_seq
    elem = torch.tensor([], dtype=cache_dtype).element_size()
    return ModelBudget(
        total_params=total, activated_params=activated, embedding_params=embed,
        routed_expert_params=routed, activated_routed_expert_params=act_routed,
        moe_layers=len(cfg.moe_layer_ids), dense_layers=L - len(cfg.moe_layer_ids),
        cache_elems_per_token=cfg.cache_elems_per_token(),
        mha_cache_elems_per_token=cfg.mha_cache_elems_per_token(),
        cache_bytes_per_token=cfg.cache_elems_per_token() * elem,
        mha_cache_bytes_per_token=cfg.mha_cache_elems_per_token() * elem,
        cache_dtype=str(cache_dtype).removeprefix("torch."), seq_len=l_seq,
        flops_per_token=72 * L * d * d + attn_flops,
        flops_per_token_active=6 * (activated - embed) + attn_flops,
    )


def pretraining_context(cfg: ModelConfig) -> int:
    """The context length the FLOPs formula should use by default: the pre-YaRN length when the
    model was extended with YaRN (e.g. 4096 for DeepSeek-V2/V3), else ``max_position_embeddings``."""
    if cfg.rope_scaling is not None:
        return min(cfg.rope_scaling.original_max_position_embeddings, cfg.max_position_embeddings)
    return cfg.max_position_embeddings


# -- host memory --------------------------------------------------------------------------------------

def available_memory() -> int | None:
    """Bytes this process can still allocate: ``MemAvailable`` of /proc/meminfo (else the free pages),
    capped by a cgroup memory limit when there is one; None when the system does not say."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:   # "max" or a huge number: no limit
                avail = min(avail, max(0, int(limit) - int(Path(usage_file).read_text().strip())))
            break
        except (OSError, ValueError):
            continue
    return avail


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}" if n >= 1e8 else f"{n / 1e9:.3f}"


def _too_big(cfg: ModelConfig, n_params: int, dtype: torch.dtype, have: str) -> ConfigError:
    need = n_params * 4 + (n_params * dtype.itemsize if dtype != torch.float32 else 0)
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    hint = (f"the embeddings alone (vocab_size {cfg.vocab_size:,} x hidden_size {cfg.hidden_size:,}) are "
            f"{embed / max(n_params, 1):.0%} of it; lower vocab_size or hidden_size" if embed * 2 > n_params
            else "lower hidden_size, num_hidden_layers, n_routed_experts or moe_intermediate_size")
    what = "float32" if dtype == torch.float32 else f"float32 (then {str(dtype).removeprefix('torch.')})"
    return ConfigError(f"this model ({n_params:,} parameters) needs ~{_gb(need)} GB for its weights in {what} "
                       f"but {have}; {hint} in the config")


def check_weights_fit(cfg: ModelConfig, n_params: int, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> None:
    """Refuse (a :class:`ConfigError`) to allocate a model whose weights cannot fit in host memory.

    Counts the float32 weights that initialisation materialises (plus the ``dtype`` copy when it is
    not float32) against :func:`available_memory`. Only CPU models are checked; others are not.
    """
    if torch.device(device).type != "cpu":
        return
    avail = available_memory()
    need = n_params * 4 + (n_params * dtype.itemsize if dtype != torch.float32 else 0)
    if avail is not None and need > avail:
        raise _too_big(cfg, n_params, dtype, f"the machine has {_gb(avail)} GB of memory available")


def allocation_error(e: BaseException, cfg: ModelConfig, n_params: int,
                     dtype: torch.dtype = torch.float32) -> ConfigError | None:
    """A one-line :class:`ConfigError` for a failed weight allocation (MemoryError, torch's
    "can't allocate memory" or out-of-memory RuntimeError); None for any other error."""
    text = str(e).lower()
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
            "can't allocate memory" in text or "out of memory" in text
            or isinstance(e, getattr(torch, "OutOfMemoryError", ())))):
        return _too_big(cfg, n_params, dtype, "allocating them ran out of memory")
    return None
