"""Typed configuration: the model (:mod:`moelab.config.model`) and config files (:mod:`moelab.config.toml`).

``from moelab.config import ModelConfig, make_config, load_model_config`` — the names every stage uses.
"""

from moelab.config.model import (
    NOT_IN_CONFIG_JSON,
    RUNTIME_FIELDS,
    CompileScope,
    ModelConfig,
    RopeScaling,
    RuntimeSettings,
    ScoringFunc,
    TopkMethod,
    runtime_settings,
    yarn_mscale,
)
from moelab.config.toml import (
    KNOWN_SECTIONS,
    format_validation_error,
    load_model_config,
    make_config,
    non_finite_settings,
    read_toml,
)

__all__ = ["KNOWN_SECTIONS", "NOT_IN_CONFIG_JSON", "RUNTIME_FIELDS", "CompileScope", "ModelConfig", "RopeScaling",
           "RuntimeSettings", "ScoringFunc", "TopkMethod", "format_validation_error", "load_model_config",
           "make_config", "non_finite_settings", "read_toml", "runtime_settings", "yarn_mscale"]
