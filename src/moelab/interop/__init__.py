"""Hugging Face checkpoint import/export: ``config.json`` mapping and safetensors weights."""

from moelab.interop.checkpoint import load, save

__all__ = ["load", "save"]
