"""Load and save Hugging Face-format checkpoints (config.json + safetensors, sharded or not).

On disk, names are exactly those of transformers' DeepseekV2/V3 (per-expert
``mlp.experts.{e}.{gate,up,down}_proj.weight``); in memory the routed experts are stacked
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``). This file is the only
place that knows both. Finding, checking and reading the weight files is :mod:`moelab.interop.weights`
(safetensors only: pickles are never opened).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.common.atomic import CHECKPOINT, write_dir
from moelab.common.progress import Bars
from moelab.config import ModelConfig
from moelab.errors import CheckpointError
from moelab.interop.hf_config import config_to_hf, hf_compatibility_warnings, read_config_json
from moelab.interop.weights import (
    INDEX,
    SINGLE,
    check_regular_file,
    check_weight_files,
    iter_tensors,
    parse_shard_size,
    stored_dtype,
    tensor_count,
    weight_files,
)
from moelab.model.transformer import DeepSeekForCausalLM

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t) + "]"


def load_state_into(model: DeepSeekForCausalLM, files: list[Path], on_tensor=None) -> None:
    """Copy HF-named tensors into ``model`` (stacking experts), checking names and shapes.

    ``on_tensor()`` is called after each tensor read (progress reporting)."""
    cfg = model.config
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    expected = {k for k, _ in model.state_dict().items()}
    filled: set[str] = set()
    experts_seen: dict[str, set[tuple[int, str]]] = {}
    unexpected: list[str] = []
    n_mtp = max(cfg.num_nextn_predict_layers, 1 if cfg.hf_model_type == "deepseek_v3" else 0)
    for name, tensor, path in iter_tensors(files):
        if on_tensor is not None:
            on_tensor()
        layer = _LAYER.match(name)
        if layer and cfg.num_hidden_layers <= int(layer.group(1)) < cfg.num_hidden_layers + n_mtp:
            continue  # DeepSeek-V3's multi-token-prediction layer(s) after the LM: not part of it
        if ".mlp.shared_experts." in name and not cfg.n_shared_experts and tensor.numel() == 0:
            continue  # transformers writes empty shared-expert tensors when there are none
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = _EXPERT.match(name)
        if m:
            prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
            target_name = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            if target_name not in params:
                unexpected.append(name)
                continue
            target = params[target_name]
            E, I = target.shape[0], cfg.moe_intermediate_size
            want = (cfg.hidden_size, I) if proj == "down_proj" else (I, cfg.hidden_size)
            if e >= E:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{path.name}: tensor {name} has shape {_shape(tensor.shape)}, "
                                      f"the config expects {_shape(want)}")
            with torch.no_grad():
                if proj == "down_proj":
                    target[e].copy_(tensor)
                else:
                    rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                    target[e, rows].copy_(tensor)
            experts_seen.setdefault(target_name, set()).add((e, proj))
            continue
        if name not in params:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            unexpected.append(name)
            continue
        target = params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path.name}: tensor {name} has shape {_shape(tensor.shape)}, the config "
                                  f"expects {_shape(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        filled.add(name)
    if unexpected and all(n.endswith("e_score_correction_bias") for n in unexpected):
        raise CheckpointError(
            f"the weights carry e_score_correction_bias ({unexpected[0]}, ...), the noaux_tc router's bias, but "
            f"config.json sets topk_method = {cfg.topk_method!r}; transformers' DeepseekV3 always "
            "uses that bias: set \"topk_method\": \"noaux_tc\" in config.json to load it")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"checkpoint has tensor(s) the config does not describe: "
                              f"{', '.join(unexpected[:5])}{more}; is config.json the one for these weights?")
    missing = []
    for name in sorted(expected):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E = params[name].shape[0]
            projs = ("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")
            seen = experts_seen.get(name, set())
            missing += [f"{name.rsplit('.', 1)[0]}.{e}.{p}.weight" for e in range(E) for p in projs
                        if (e, p) not in seen]
        elif name not in filled and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")


def load(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         progress: bool = False, **config_overrides) -> DeepSeekForCausalLM:
    """Load a Hugging Face DeepSeek-V2/V3 (or moelab) checkpoint directory.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or sharded safetensors + index.
        dtype: parameter dtype; None keeps the dtype stored in the checkpoint. Router weights and the
            balancing bias stay fp32.
        device: where to put the weights.
        progress: show a progress bar (on stderr) while tensors are read.
        **config_overrides: moelab settings to change, e.g. ``attn_impl="naive"``.

    Returns the model in eval mode; ``model(input_ids)`` returns an object with ``.logits [B, T, V]``.
    """
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; moelab.load wants the checkpoint directory "
                              "(config.json + safetensors)")
    cfg = read_config_json(directory, **config_overrides)
    files = weight_files(directory)
    if dtype is None:
        dtype = stored_dtype(files[0])
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    model.to(dtype).to_empty(device=device)  # allocate once, at the target dtype (the bias stays fp32)
    if progress:
        with Bars() as bars:
            task = bars.add_task(f"loading {directory.name}", total=sum(tensor_count(f) for f in files))
            load_state_into(model, files, on_tensor=lambda: bars.advance(task))
    else:
        load_state_into(model, files)
    model.reset_buffers()
    return model.eval()


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def export_state_dict(model: DeepSeekForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) pairs, splitting stacked experts into per-expert tensors."""
    cfg = model.config
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix, I = name.rsplit(".", 1)[0], cfg.moe_intermediate_size
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :I]
                yield f"{prefix}.{e}.up_proj.weight", t[e, I:]
        elif name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def save(model: DeepSeekForCausalLM, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
         tokenizer: str | os.PathLike | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory that
    ``transformers.AutoModelForCausalLM.from_pretrained`` opens.

    Written atomically: everything goes to a temporary sibling directory that replaces ``path`` only
    when complete. ``tokenizer`` may name a ``tokenizer.json`` file or a directory holding one. An
    existing ``path`` is replaced only if it is a checkpoint moelab wrote (nothing but checkpoint files)
    and ``overwrite`` is true; a directory with anything else in it is refused (:mod:`moelab.common.atomic`).
    """
    if not isinstance(model, DeepSeekForCausalLM):
        raise CheckpointError(f"moelab.save expects a moelab model, got {type(model).__name__}")
    for msg in hf_compatibility_warnings(model.config):
        warnings.warn(f"moelab.save: {msg}", stacklevel=2)
    return write_dir(Path(path), lambda tmp: _write(model, tmp, parse_shard_size(max_shard_size), tokenizer),
                     kind=CHECKPOINT, overwrite=overwrite)


def _write(model: DeepSeekForCausalLM, directory: Path, shard_bytes: int, tokenizer) -> None:
    cfg: ModelConfig = model.config
    dtype_name = str(model.dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in export_state_dict(model):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    total = 0
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in shard.items()}
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX).write_text(json.dumps(index, indent=2))
    write_config_files(cfg, dtype_name, directory)
    if tokenizer is not None:
        copy_tokenizer(Path(tokenizer), directory)


def write_config_files(cfg: ModelConfig, dtype_name: str, directory: Path) -> None:
    """``config.json`` and ``generation_config.json`` of a checkpoint whose weights are ``dtype_name``."""
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype_name), indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))


def copy_tokenizer(src: Path, directory: Path) -> None:
    """Copy a tokenizer (a tokenizer.json file, or a directory with one) next to the weights."""
    src_dir = src if src.is_dir() else src.parent
    tok = src if src.is_file() else src / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"no tokenizer.json at {src}")
    shutil.copyfile(tok, directory / "tokenizer.json")
    for extra in TOKENIZER_FILES[1:]:
        if (src_dir / extra).is_file():
            shutil.copyfile(src_dir / extra, directory / extra)
    _add_chat_template(directory)


def _add_chat_template(directory: Path) -> None:
    """Give a moelab tokenizer copied without a chat template (written before it had one) moelab's."""
    from tokenizers import Tokenizer

    from moelab.common.chat_template import CHAT_TEMPLATE, wants_chat_template

    cfg_path = directory / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is left as it was copied
        return
    if cfg is None or "chat_template" in cfg or cfg.get("tokenizer_class") != "PreTrainedTokenizerFast":
        return
    if wants_chat_template(lambda t: tok.token_to_id(t) is not None):
        cfg_path.write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False))


__all__ = ["INDEX", "SINGLE", "TOKENIZER_FILES", "check_regular_file", "check_weight_files", "copy_tokenizer",
           "export_state_dict", "iter_tensors", "load", "load_state_into", "save", "weight_files"]
