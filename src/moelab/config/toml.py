"""Config files: TOML reading, ``--set``-style values into a :class:`ModelConfig`, and validation
messages that name the key, the file and what would be valid ("did you mean ...?").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ValidationError

from moelab.config.model import ModelConfig
from moelab.errors import ConfigError, did_you_mean


def format_validation_error(err: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = model
            for part in e["loc"][:-1]:  # walk nested models to suggest from the right field set
                field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
                ann = getattr(field, "annotation", None)
                parent = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                               and issubclass(a, BaseModel)), None)
            fields = parent.model_fields if parent else {}
            lines.append(f"unknown key '{loc}' in {where}{did_you_mean(str(e['loc'][-1]), fields)}")
        elif e["type"] == "value_error":
            lines.append(f"{f'{loc} in ' if loc else ''}{where}: {str(e['msg']).removeprefix('Value error, ')}")
        elif e["type"] == "finite_number":
            lines.append(f"{loc} in {where} must be a finite number (got {e.get('input')!r})")
        else:
            lines.append(f"{loc} in {where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config — " + "; ".join(lines)


def non_finite_settings(data: Any, prefix: str = "") -> list[str]:
    """``"<key> must be a finite number (got nan)"`` for each inf / nan float in a nested settings dict.

    For sections whose models do not refuse non-finite floats themselves (pydantic ``allow_inf_nan``).
    """
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found += non_finite_settings(value, f"{prefix}{key}.")
    elif isinstance(data, list | tuple):
        for value in data:
            found += non_finite_settings(value, prefix)
    elif isinstance(data, float) and not math.isfinite(data):
        found.append(f"{prefix.rstrip('.')} must be a finite number (got {data})")
    return found


def make_config(values: dict[str, Any], where: str = "[model]") -> ModelConfig:
    """Build a :class:`ModelConfig`, turning validation failures into a readable :class:`ConfigError`."""
    try:
        return ModelConfig(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where, ModelConfig)) from None


#: Top-level TOML sections moelab knows: the model, the pre-training stage (moelab.train.config) and the
#: torchrun layout (moelab.dist.mesh).
KNOWN_SECTIONS = {"model", "data", "train", "balance", "runtime", "parallel"}
#: The sections a vision-language config adds to [model] (moelab.model.vl_config): the image encoder, the
#: adaptor and the image processor. Commands that read a language model alone refuse them, saying so.
VL_SECTIONS = frozenset({"vision", "projector", "processor"})


def read_toml(path: str | Path, sections: set[str] = KNOWN_SECTIONS, require_model: bool = True) -> dict[str, Any]:
    """Parse a TOML config, rejecting unknown sections (with a "did you mean")."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a TOML config file (e.g. configs/tiny.toml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for key in data:
        if key in VL_SECTIONS and key not in sections:
            raise ConfigError(f"[{key}] in {path} belongs to a vision-language config (a DeepSeek-VL2 model: [model], "
                              "[vision], [projector], [processor]); this command reads a language model alone — "
                              "VL configs go to `moelab info` and `moelab vl ...`")
        if key not in sections:
            raise ConfigError(f"unknown section [{key}] in {path}{did_you_mean(key, sections)}; "
                              f"known sections: {', '.join(sorted(sections))}")
        if not isinstance(data[key], dict):
            raise ConfigError(f"'{key}' in {path} must be a [{key}] table of settings, not {data[key]!r}")
    if not require_model:
        return data
    if "model" not in data:
        raise ConfigError(f"{path} has no [model] section")
    if not isinstance(data["model"], dict):
        raise ConfigError(f"'model' in {path} must be a [model] table of settings, not {data['model']!r}")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """Read the ``[model]`` section of a TOML file into a validated :class:`ModelConfig`."""
    return make_config(read_toml(path)["model"], where=f"[model] of {path}")
