"""Save and load vision-language models in the layout of the released DeepSeek-VL2 checkpoints.

    save_vl(model, "runs/vl/model", tokenizer=tok)        # config.json, processor_config.json, safetensors
    model = load_vl("runs/vl/model")                      # or a released deepseek-ai/deepseek-vl2-* directory

config.json and processor_config.json: :mod:`moelab.interop.vl_hf_config`. Tensor names are the released ones
(``DeepseekVLV2ForCausalLM``: ``self.vision`` a timm VisionTransformer, ``self.projector``, ``self.language``
the hub DeepseekV2ForCausalLM), mapped to moelab's (C encoder width, P patches, D language width)::

    released                                           moelab
    language.{DeepseekV2 name}                         language.*  (experts split/stacked as moelab.save does)
    vision.patch_embed.proj.{weight,bias}              vision.embeddings.patch_embedding.*      [C, 3, p, p], [C]
    vision.pos_embed                      [1, P, C]    vision.embeddings.position_embedding.weight  [P, C]
    vision.blocks.{i}.norm1 / .norm2                   vision.encoder.layers.{i}.layer_norm1 / layer_norm2
    vision.blocks.{i}.attn.qkv      [3C, C], [3C]      ...self_attn.{q,k,v}_proj stacked by rows: q, k, v
    vision.blocks.{i}.attn.proj                        ...self_attn.out_proj
    vision.blocks.{i}.mlp.fc1 / .fc2                   ...mlp.fc1 / fc2
    vision.norm                                        vision.post_layernorm
    projector.layers.{0,2}.{weight,bias}               projector.layers.{0,2}.*   [D, C·d²], [D, D]
    image_newline [D], view_seperator [D] (sic)        image_newline, view_separator
    vision.attn_pool.*   released only: SigLIP's attention-pooling head, which DeepSeek-VL2 never runs
                         (ignore_head) — skipped on load; not written (config.json says global_pool "")

(timm's fused ``qkv`` output is read as ``[3, heads, C/heads]``: its first C rows are the queries of every
head, as transformers' q_proj.) Weights are safetensors only, written atomically (a temporary sibling that
replaces ``path`` when complete, :mod:`moelab.common.atomic`). Loading checks every name and shape.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.common.atomic import CHECKPOINT, OutputKind, write_dir
from moelab.errors import CheckpointError
from moelab.interop.checkpoint import copy_tokenizer, export_state_dict
from moelab.interop.vl_hf_config import (
    PROCESSOR_CONFIG,
    is_vl_checkpoint,
    processor_config,
    read_vl_config,
    vl_config_to_hf,
)
from moelab.interop.weights import INDEX, SINGLE, iter_tensors, parse_shard_size, stored_dtype, weight_files
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.model.vl_model import VisionLanguageModel

#: What a VL checkpoint directory may hold (a moelab checkpoint's files plus the processor settings).
VL_CHECKPOINT = OutputKind("VL checkpoint", "config.json", (*CHECKPOINT.patterns, PROCESSOR_CONFIG))
_HEAD = "vision.attn_pool."
_LAYER = re.compile(r"^vision\.encoder\.layers\.(\d+)\.(.+)$")
_BLOCK = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.fc1",
          "mlp.fc2": "mlp.fc2"}
_TOP = {"vision.embeddings.patch_embedding": "vision.patch_embed.proj", "vision.post_layernorm": "vision.norm",
        "projector.layers.0": "projector.layers.0", "projector.layers.2": "projector.layers.2"}


def _shape(s) -> str:
    return "[" + ", ".join(str(x) for x in s) + "]"


def released_layout(model: VisionLanguageModel) -> dict[str, list[torch.Tensor]]:
    """Released name -> the model's tensors (views, in order) whose row-wise concatenation it is.

    ``vision.pos_embed`` is the one reshaped tensor (``[1, P, C]`` on disk, ``[P, C]`` in the model)."""
    out = {f"language.{n}": [t] for n, t in export_state_dict(model.language)}
    sd = model.state_dict()
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        if name.startswith("language."):
            continue
        if name == "vision.embeddings.position_embedding.weight":
            out["vision.pos_embed"] = [t]
        elif name in ("image_newline", "view_separator"):
            out["view_seperator" if name == "view_separator" else name] = [t]
        elif m := _LAYER.match(name):
            i, rest = m.groups()
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"vision.blocks.{i}.attn.qkv.{kind}", {})[module[-6]] = t
            elif module in _BLOCK:
                out[f"vision.blocks.{i}.{_BLOCK[module]}.{kind}"] = [t]
            else:
                raise CheckpointError(f"no released name for {name}")
        else:
            module, kind = name.rsplit(".", 1)
            if module not in _TOP:
                raise CheckpointError(f"no released name for {name}")
            out[f"{_TOP[module]}.{kind}"] = [t]
    for name, parts in qkv.items():
        out[name] = [parts["q"], parts["k"], parts["v"]]
    return out


def _disk_shape(name: str, parts: list[torch.Tensor]) -> tuple[int, ...]:
    if name == "vision.pos_embed":
        return (1, *parts[0].shape)
    return (sum(p.shape[0] for p in parts), *parts[0].shape[1:])


def export_vl_state_dict(model: VisionLanguageModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(released name, tensor) pairs of ``model`` (module docstring)."""
    for name, parts in released_layout(model).items():
        yield name, (torch.cat(parts) if len(parts) > 1 else parts[0]).reshape(_disk_shape(name, parts))


def _skipped(name: str, tensor: torch.Tensor, model: VisionLanguageModel) -> bool:
    """Released tensors that have no place in moelab's model, by design."""
    cfg = model.language.config
    return (name.startswith(_HEAD)                                   # the never-run pooling head
            or name.endswith("rotary_emb.inv_freq")                   # recomputed
            or (name == "language.lm_head.weight" and cfg.tie_word_embeddings)
            or (".mlp.shared_experts." in name and not cfg.n_shared_experts and tensor.numel() == 0))


def load_vl_state_into(model: VisionLanguageModel, source: str | os.PathLike | list[Path], on_tensor=None) -> None:
    """Copy a VL checkpoint's tensors (a directory, or its weight files) into ``model``, checking every name and
    shape: missing, unexpected or misshapen tensors are a :class:`CheckpointError` naming them."""
    if isinstance(source, list):
        files = source
    else:
        directory = Path(source)
        if not is_vl_checkpoint(directory):
            read_vl_config(directory)               # raises the reason (no directory, no config.json, not VL)
        files = weight_files(directory)
    layout = released_layout(model)
    filled: set[str] = set()
    unexpected: list[str] = []
    for name, tensor, path in iter_tensors(files):
        if on_tensor is not None:
            on_tensor()
        if name not in layout:
            if not _skipped(name, tensor, model):
                unexpected.append(name)
            continue
        parts = layout[name]
        want = _disk_shape(name, parts)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{path.name}: tensor {name} has shape {_shape(tensor.shape)}, the config expects "
                                  f"{_shape(want)}")
        rows = tensor.reshape(-1, *parts[0].shape[1:]) if name == "vision.pos_embed" else tensor
        with torch.no_grad():
            for part, chunk in zip(parts, rows.split([p.shape[0] for p in parts]), strict=True):
                part.copy_(chunk)
        filled.add(name)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"checkpoint has tensor(s) the config does not describe: {', '.join(unexpected[:5])}"
                              f"{more}; is config.json the one for these weights?")
    missing = sorted(set(layout) - filled)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")


def _dtype(dtype, files: list[Path]) -> torch.dtype:
    if dtype is None:
        return stored_dtype(files[0])
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return getattr(torch, dtype)
    return dtype


def load_vl(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
            image_token_id: int | None = None, progress: bool = False, **config_overrides) -> VisionLanguageModel:
    """Load a DeepSeek-VL2 checkpoint directory (moelab's or a released one) as a :class:`VisionLanguageModel`.

    ``dtype`` None keeps the stored dtype (the router weights and the balancing bias stay fp32).
    ``image_token_id`` overrides the ``<image>`` id found in config.json or tokenizer.json (one is needed).
    The released files' pooling head (``vision.attn_pool.*``) is skipped: DeepSeek-VL2 never runs it.
    ``config_overrides`` go to the language model (e.g. ``attn_impl="naive"``). Returns the model in eval mode.
    """
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; load_vl wants the checkpoint directory "
                              "(config.json + safetensors)")
    cfg = read_vl_config(directory, image_token_id=image_token_id, **config_overrides)
    if cfg.image_token_id is None:
        raise CheckpointError(f"{directory}: cannot tell the <image> token id (no image_token_id in config.json, no "
                              "tokenizer.json with <image>); pass image_token_id=")
    files = weight_files(directory)
    dtype = _dtype(dtype, files)
    with torch.device("meta"):
        model = VisionLanguageModel(DeepSeekForCausalLM(cfg.language), cfg.vision, cfg.image_token_id,
                                    cfg.downsample, config=cfg)
    model.to(dtype).to_empty(device=device)
    if progress:
        from moelab.common.progress import Bars
        from moelab.interop.weights import tensor_count

        with Bars() as bars:
            task = bars.add_task(f"loading {directory.name}", total=sum(tensor_count(f) for f in files))
            load_vl_state_into(model, files, on_tensor=lambda: bars.advance(task))
    else:
        load_vl_state_into(model, files)
    model.language.reset_buffers()
    return model.eval()


def save_vl(model: VisionLanguageModel, path: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype | None = None,
            overwrite: bool = False, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` as a checkpoint in the released DeepSeek-VL2 layout (module docstring); returns ``path``.

    ``tokenizer``: a ``tokenizers.Tokenizer``, a tokenizer.json file or a directory with one (copied beside the
    weights). ``dtype``: the dtype to write (default: the model's; the balancing bias stays fp32). An existing
    ``path`` is replaced only if it is a checkpoint moelab wrote and ``overwrite`` is true.
    """
    if not isinstance(model, VisionLanguageModel):
        raise CheckpointError(f"save_vl expects a moelab VisionLanguageModel, got {type(model).__name__}")
    shard_bytes = parse_shard_size(max_shard_size)
    return write_dir(Path(path), lambda tmp: _write(model, tmp, tokenizer, dtype, shard_bytes), kind=VL_CHECKPOINT,
                     overwrite=overwrite)


def _write(model: VisionLanguageModel, directory: Path, tokenizer, dtype: torch.dtype | None, shard_bytes: int):
    cfg = model.vl_config
    if cfg.image_token_id != model.image_token_id:
        cfg = cfg.with_image_token(model.image_token_id)
    out_dtype = dtype or model.language.model.embed_tokens.weight.dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in export_vl_state_dict(model):
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in shard.items()}
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX).write_text(json.dumps(index, indent=2))
    dtype_name = str(out_dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(vl_config_to_hf(cfg, dtype_name), indent=2))
    (directory / PROCESSOR_CONFIG).write_text(json.dumps(processor_config(cfg), indent=2, ensure_ascii=False))
    if tokenizer is None:
        return
    if hasattr(tokenizer, "token_to_id") and hasattr(tokenizer, "save"):
        tokenizer.save(str(directory / "tokenizer.json"))
    else:
        copy_tokenizer(Path(tokenizer), directory)


__all__ = ["VL_CHECKPOINT", "export_vl_state_dict", "is_vl_checkpoint", "load_vl", "load_vl_state_into",
           "read_vl_config", "released_layout", "save_vl"]
