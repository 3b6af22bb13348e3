"""moelab: a PyTorch toolkit for DeepSeek-style sparse language models.

    import moelab
    model = moelab.load("path/to/hf-checkpoint")      # DeepSeek-V2/V3 in Hugging Face format
    logits = model(input_ids).logits                   # [B, T, V]
    moelab.save(model, "out/")                         # opens in transformers

The names below are imported on first use, so that ``import moelab`` (and the ``moelab`` command's
``--help``) does not wait for torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {"ModelConfig": "moelab.config", "load_model_config": "moelab.config", "CheckpointError": "moelab.errors",
          "ConfigError": "moelab.errors", "MoelabError": "moelab.errors", "load": "moelab.interop.checkpoint",
          "save": "moelab.interop.checkpoint", "DeepSeekForCausalLM": "moelab.model.transformer"}
__all__ = ["CheckpointError", "ConfigError", "DeepSeekForCausalLM", "ModelConfig", "MoelabError", "load",
           "load_model_config", "save", "__version__"]

if TYPE_CHECKING:
    from moelab.config import ModelConfig, load_model_config
    from moelab.errors import CheckpointError, ConfigError, MoelabError
    from moelab.interop.checkpoint import load, save
    from moelab.model.transformer import DeepSeekForCausalLM


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"moelab.{name}") is not None:
        return importlib.import_module(f"moelab.{name}")   # moelab.config, moelab.model, ... as before
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")
