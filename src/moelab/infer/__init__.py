"""Inference: sampling and generation with the decoding cache (MLA latent cache)."""

from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingConfig

__all__ = ["SamplingConfig", "generate"]
