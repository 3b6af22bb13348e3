"""Extend a checkpoint's context with YaRN (docs/methods.md §4, §11): the same weights, new RoPE
frequencies — ``moelab extend-context CKPT --factor F --out DIR``.

    extend_context("runs/code/model", factor=4, out="runs/code-long/model")

DeepSeek-V2/V3 and Coder-V2 extend 4K → 128K with s = 40 (``factor``), α = ``beta_slow`` = 1, β =
``beta_fast`` = 32, and ``mscale`` = ``mscale_all_dim`` = 0.707 (their config.json values: the attention
logits are scaled by (0.1·0.707·ln s + 1)², the RoPE dimensions' cos/sin not at all). These are the
defaults. A checkpoint without YaRN gets ``original_max_position_embeddings`` = its current
``max_position_embeddings``; one that has YaRN already keeps its original length and multiplies its
factor. ``max_position_embeddings`` becomes original × factor. The weights are copied unchanged (YaRN
only changes the rotary frequencies), the tokenizer with them; ``transformers`` opens the result (tested).
Train briefly at the longer length afterwards (``moelab train`` with ``train.init_from``), as the papers
do (Coder-V2: 1,000 steps at 32K, then 1,000 at 128K).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moelab.common.atomic import CHECKPOINT, check_output_dir, write_dir
from moelab.config import ModelConfig
from moelab.config.model import RopeScaling
from moelab.errors import CheckpointError
from moelab.interop.hf_config import config_to_hf, read_config_json
from moelab.interop.weights import check_weight_files


def extended_config(cfg: ModelConfig, factor: float, beta_fast: float = 32.0, beta_slow: float = 1.0,
                    mscale: float = 0.707, mscale_all_dim: float = 0.707) -> ModelConfig:
    """``cfg`` with its context extended ``factor`` times by YaRN (module docstring)."""
    if not 1 < factor < float("inf"):
        raise CheckpointError(f"--factor must be > 1 and finite (got {factor}); YaRN extends the context")
    old = cfg.rope_scaling
    if old is not None:
        # a fixed cos/sin factor belonged to the old scale: the new one follows from mscale / mscale_all_dim
        scaling = old.model_copy(update={"factor": old.factor * factor, "attention_factor": None})
    else:
        scaling = RopeScaling(factor=factor, original_max_position_embeddings=cfg.max_position_embeddings,
                              beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim)
    longest = int(scaling.original_max_position_embeddings * scaling.factor)
    data = cfg.model_dump()
    data.update(rope_scaling=scaling.model_dump(), max_position_embeddings=longest)
    return ModelConfig.model_validate(data)


def extend_context(ckpt: str | os.PathLike, factor: float, out: str | os.PathLike, *, overwrite: bool = False,
                   **yarn) -> Path:
    """Write ``out``: the checkpoint ``ckpt`` with YaRN scaling ``factor`` (weights and tokenizer copied)."""
    src, out = Path(ckpt), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a checkpoint directory (config.json + safetensors)")
    if out.exists() and out.resolve() == src.resolve():
        raise CheckpointError("--out is the checkpoint itself; write the extended checkpoint to a new directory")
    cfg = read_config_json(src)
    check_weight_files(src)                 # the weights are copied unread: check them whole first
    new = extended_config(cfg, factor, **yarn)
    raw = json.loads((src / "config.json").read_text())
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    check_output_dir(out, CHECKPOINT, overwrite)

    # every key of the old config.json is kept (hub extras included); the RoPE keys are rewritten
    hf = config_to_hf(new, dtype)
    merged = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_theta", "rope_parameters")}
    merged.update(hf)

    def write(tmp: Path) -> None:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(merged, indent=2))

    return write_dir(out, write, kind=CHECKPOINT, overwrite=overwrite)


__all__ = ["extend_context", "extended_config"]
