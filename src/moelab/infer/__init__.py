"""Inference: sampling and generation with the decoding caches (MLA latent cache; growable or static)."""

from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingConfig
from moelab.infer.static import DECODE_MODES

__all__ = ["DECODE_MODES", "SamplingConfig", "generate"]
