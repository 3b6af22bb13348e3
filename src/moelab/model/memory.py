"""Will a model's weights fit in host memory? Checked before allocating them, explained when they do not.

:func:`check_weights_fit` counts the float32 weights that initialisation materialises (4 bytes per
parameter, plus the ``dtype`` copy when it is not float32) against :func:`available_memory`;
:func:`allocation_error` turns a failed allocation into the same one-line :class:`ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moelab.config import ModelConfig
from moelab.errors import ConfigError


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
