"""moelab: a PyTorch toolkit for DeepSeek-style sparse language models.

    import moelab
    model = moelab.load("path/to/hf-checkpoint")      # DeepSeek-V2/V3 in Hugging Face format
    logits = model(input_ids).logits                   # [B, T, V]
    moelab.save(model, "out/")                         # opens in transformers
"""

from moelab.config import ModelConfig, load_model_config
from moelab.errors import CheckpointError, ConfigError, MoelabError
from moelab.interop.checkpoint import load, save
from moelab.model.transformer import DeepSeekForCausalLM

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DeepSeekForCausalLM", "ModelConfig", "MoelabError", "load",
           "load_model_config", "save", "__version__"]
