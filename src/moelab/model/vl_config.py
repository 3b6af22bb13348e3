"""The configuration of a DeepSeek-VL2-style vision-language model (docs/methods.md §12): the language model,
the image encoder, the adaptor and the image processor — :class:`VLConfig`, read from a TOML with four sections.

Legend: T the tile (the encoder's image_size, 384), p the patch (14), C the encoder width (1152), I its MLP
width (4304), d the downsampling (2), D the language model's width, g = ⌈⌊T/p⌋/d⌉ tokens per tile side (14).

    [model]      the language model, as in every moelab config (:class:`~moelab.config.ModelConfig`)
    [vision]     hidden_size C, intermediate_size I, num_hidden_layers, num_attention_heads, image_size T,
                 patch_size p, layer_norm_eps  (transformers' SiglipVisionConfig names; SigLIP-SO400M/14@384
                 by default) -> encoder: views [V, 3, T, T] -> [V, (T/p)², C]
    [projector]  projector_type "downsample_mlp_gelu", downsample_ratio d, depth 2, mlp_ratio 1
                 -> [V, g², C·d²] -> Linear(C·d² -> D) -> GELU -> Linear(D -> D) -> [V, g², D]
    [processor]  tile_size (= T), patch_size (= p), max_tiles (9) or candidate_resolutions [[w, h], ...]
                 (every (m·T, n·T) with m·n <= max_tiles, any order), image_mean / image_std (0.5, 0.5, 0.5),
                 image_token_id (the tokenizer's <image> id; may be left out and set at build time with
                 :meth:`VLConfig.with_image_token`, as ``moelab vl train`` does from its tokenizer)

Other sections ([vl], [data], [train], [balance], ...) may sit beside these: they belong to the training
stage (:mod:`moelab.train.vl_config`) and are not read here. Unknown keys inside the four are errors that
name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moelab.config import KNOWN_SECTIONS, ModelConfig, format_validation_error, make_config, read_toml
from moelab.config.toml import VL_SECTIONS
from moelab.errors import ConfigError
from moelab.model.vision_encoder import VisionConfig

#: Sections of a VL stage config that are not the model's (read by moelab.train.vl_config).
STAGE_SECTIONS = frozenset({"vl"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data):
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation is not bool:
                    raise ValueError(f"{key} must be a number, not a boolean (got {value})")
        return data


class VisionSettings(_Section):
    """``[vision]``: the SigLIP encoder (defaults: SigLIP-SO400M/14@384, as DeepSeek-VL2)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @model_validator(mode="after")
    def _check(self) -> VisionSettings:
        bad = [f"{k} must be positive (got {v})" for k, v in self.model_dump().items() if v <= 0]
        if not bad and self.hidden_size % self.num_attention_heads:
            bad.append(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                       f"({self.num_attention_heads})")
        if not bad and self.patch_size > self.image_size:
            bad.append(f"patch_size ({self.patch_size}) is larger than image_size ({self.image_size})")
        if bad:
            raise ValueError("; ".join(bad))
        return self

    def encoder_config(self) -> VisionConfig:
        return VisionConfig(**self.model_dump())


class ProjectorSettings(_Section):
    """``[projector]``: DeepSeek-VL2's adaptor. moelab builds the released one only (depth 2, mlp_ratio 1)."""

    projector_type: Literal["downsample_mlp_gelu"] = "downsample_mlp_gelu"
    downsample_ratio: int = 2
    depth: Literal[2] = 2
    mlp_ratio: Literal[1] = 1

    @model_validator(mode="after")
    def _check(self) -> ProjectorSettings:
        if self.downsample_ratio < 1:
            raise ValueError(f"downsample_ratio must be >= 1 (got {self.downsample_ratio})")
        return self


class ProcessorSettings(_Section):
    """``[processor]``: how images become views and image tokens. ``tile_size``/``patch_size`` default to the
    encoder's; give ``max_tiles`` or ``candidate_resolutions`` (or neither: max_tiles 9)."""

    tile_size: int | None = None
    patch_size: int | None = None
    max_tiles: int | None = None
    candidate_resolutions: tuple[tuple[int, int], ...] | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_token_id: int | None = None

    @model_validator(mode="after")
    def _check(self) -> ProcessorSettings:
        for name in ("tile_size", "patch_size", "max_tiles"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (got {v})")
        if self.max_tiles is not None and self.candidate_resolutions is not None:
            raise ValueError("give max_tiles or candidate_resolutions, not both")
        if self.candidate_resolutions is not None and not self.candidate_resolutions:
            raise ValueError("candidate_resolutions is empty")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive (got {list(self.image_std)})")
        if self.image_token_id is not None and self.image_token_id < 0:
            raise ValueError(f"image_token_id must not be negative (got {self.image_token_id})")
        return self


def tile_candidates(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every canvas ``(m·tile, n·tile)`` with ``m·n <= max_tiles``, width multiple outer (the order of
    :func:`moelab.vision.tiling.candidate_resolutions`)."""
    return [(m * tile, n * tile) for m in range(1, max_tiles + 1) for n in range(1, max_tiles // m + 1)]


def release_order(candidates: list[tuple[int, int]], tile: int) -> list[tuple[int, int]]:
    """The order of the released config.json files: by tiles m·n, then the thinner side, then the width."""
    return sorted(candidates, key=lambda wh: (wh[0] // tile * (wh[1] // tile), min(wh) // tile, wh[0] // tile))


def max_tiles_of(candidates, tile: int) -> int:
    """The ``max_tiles`` whose candidate set ``candidates`` is (any order); a :class:`ConfigError` otherwise."""
    pairs = [tuple(int(x) for x in wh) for wh in candidates]
    bad = [wh for wh in pairs if len(wh) != 2 or min(wh) < tile or wh[0] % tile or wh[1] % tile]
    if bad:
        raise ConfigError(f"candidate_resolutions must be [width, height] multiples of the tile {tile} "
                          f"(got {list(bad[0])})")
    k = max(w // tile * (h // tile) for w, h in pairs)
    if sorted(pairs) != sorted(tile_candidates(k, tile)):
        raise ConfigError(f"candidate_resolutions is not the set {{(m·{tile}, n·{tile}) : m·n <= k}} of any k "
                          f"(the largest canvas has {k} tiles); moelab's tiling takes every such canvas — "
                          "give max_tiles instead")
    return k


@dataclass(frozen=True)
class VLConfig:
    """A vision-language model: the language model, the encoder, the adaptor and the processor settings
    (module docstring). ``processor`` is resolved: tile, patch and max_tiles are always set."""

    language: ModelConfig
    vision: VisionConfig = VisionConfig()
    projector: ProjectorSettings = ProjectorSettings()
    processor: ProcessorSettings = ProcessorSettings()
    image_token_id: int | None = None

    def __post_init__(self):
        v, p = self.vision, self.processor
        tile = v.image_size if p.tile_size is None else p.tile_size
        patch = v.patch_size if p.patch_size is None else p.patch_size
        if tile != v.image_size:
            raise ConfigError(f"processor tile_size {tile} is not the encoder's image_size {v.image_size}: the "
                              "encoder sees one tile at a time")
        if patch != v.patch_size:
            raise ConfigError(f"processor patch_size {patch} is not the encoder's patch_size {v.patch_size}")
        k = p.max_tiles
        if k is None:
            k = 9 if p.candidate_resolutions is None else max_tiles_of(p.candidate_resolutions, tile)
        token = self.image_token_id if self.image_token_id is not None else p.image_token_id
        if token is not None and not 0 <= token < self.language.vocab_size:
            raise ConfigError(f"image_token_id {token} must lie in [0, vocab_size={self.language.vocab_size})")
        object.__setattr__(self, "processor", p.model_copy(update=dict(
            tile_size=tile, patch_size=patch, max_tiles=k, candidate_resolutions=None, image_token_id=token)))
        object.__setattr__(self, "image_token_id", token)

    # --- derived -----------------------------------------------------------------------------
    @property
    def tile(self) -> int:
        return self.processor.tile_size

    @property
    def patch(self) -> int:
        return self.processor.patch_size

    @property
    def downsample(self) -> int:
        return self.projector.downsample_ratio

    @property
    def max_tiles(self) -> int:
        return self.processor.max_tiles

    @property
    def grid(self) -> int:
        """g: tokens per tile side after the d×d compression."""
        return math.ceil((self.tile // self.patch) / self.downsample)

    def candidate_resolutions(self) -> list[tuple[int, int]]:
        return tile_candidates(self.max_tiles, self.tile)

    def processor_settings(self) -> dict[str, int]:
        """Keyword arguments of :class:`moelab.vision.processor.VLProcessor` (tile, patch, downsample, max_tiles)."""
        return dict(tile=self.tile, patch=self.patch, downsample=self.downsample, max_tiles=self.max_tiles)

    def with_image_token(self, image_token_id: int) -> VLConfig:
        """The same model with the tokenizer's ``<image>`` id."""
        return dataclasses.replace(self, image_token_id=image_token_id,
                                   processor=self.processor.model_copy(update={"image_token_id": image_token_id}))

    @classmethod
    def from_toml(cls, path: str | Path) -> VLConfig:
        return load_vl_config(path)


def _section(kind: type[BaseModel], values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table of settings, not {values!r}")
    try:
        return kind(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where, kind)) from None


def vl_config_from_sections(sections: dict[str, Any], where: str = "the config") -> VLConfig:
    """A :class:`VLConfig` from parsed ``[model]``, ``[vision]``, ``[projector]``, ``[processor]`` tables."""
    if "model" not in sections:
        raise ConfigError(f"{where} has no [model] section (the language model)")
    if "vision" not in sections:
        raise ConfigError(f"{where} has no [vision] section; a vision-language config needs [model] and [vision] "
                          "(and optionally [projector], [processor])")
    if not isinstance(sections["model"], dict):
        raise ConfigError(f"[model] of {where} must be a table of settings, not {sections['model']!r}")
    language = make_config(sections["model"], where=f"[model] of {where}")
    vision = _section(VisionSettings, sections["vision"], f"[vision] of {where}").encoder_config()
    projector = _section(ProjectorSettings, sections.get("projector", {}), f"[projector] of {where}")
    processor = _section(ProcessorSettings, sections.get("processor", {}), f"[processor] of {where}")
    try:
        return VLConfig(language, vision, projector, processor)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_vl_config(path: str | Path) -> VLConfig:
    """Read a VL TOML (module docstring) into a validated :class:`VLConfig`."""
    data = read_toml(path, KNOWN_SECTIONS | VL_SECTIONS | STAGE_SECTIONS)
    return vl_config_from_sections({k: v for k, v in data.items() if k == "model" or k in VL_SECTIONS},
                                   where=str(path))


def is_vl_toml(path: str | Path) -> bool:
    """Whether ``path`` is a readable TOML with a ``[vision]``, ``[projector]`` or ``[processor]`` section."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return any(k in VL_SECTIONS for k in data)


__all__ = ["STAGE_SECTIONS", "ProcessorSettings", "ProjectorSettings", "VLConfig", "VisionSettings", "is_vl_toml",
           "load_vl_config", "max_tiles_of", "release_order", "tile_candidates", "vl_config_from_sections"]
