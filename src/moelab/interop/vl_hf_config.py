"""``config.json`` and ``processor_config.json`` of a DeepSeek-VL2 checkpoint <-> a :class:`VLConfig`.

The layout is that of the released models (deepseek-ai/DeepSeek-VL2, ``modeling_deepseek_vl_v2.py``:
``DeepseekVLV2Config`` with its ``VisionEncoderConfig`` and ``MlpProjectorConfig``; ``processing_deepseek_vl_v2.py``)::

    config.json
      model_type "deepseek_vl_v2", architectures ["DeepseekVLV2ForCausalLM"]
      language_config    the DeepseekV2 dict moelab.save writes for the language model
      vision_config      model_type "vision", model_name, image_size T, patch_size p, width C, layers, heads,
                         mlp_ratio (int(C·mlp_ratio) = the MLP width I, as timm builds it), global_pool,
                         ignore_head true, class_token false, num_classes 0
                         + moelab's exact intermediate_size I and layer_norm_eps (the release ignores them)
      projector_config   model_type "mlp_projector", projector_type "downsample_mlp_gelu", input_dim C,
                         n_embed D, depth 2, mlp_ratio 1, downsample_ratio d, token_pooling false
      tile_tag "2D", global_view_pos "head", candidate_resolutions [[384, 384], [384, 768], ...]
      image_token_id     moelab's (the release reads it from the tokenizer; so does load when it is absent)
    processor_config.json    DeepseekVLV2Processor's arguments: candidate_resolutions, patch_size,
                         downsample_ratio, image_mean / image_std 0.5, normalize, image_token "<image>",
                         pad_token, add_special_token false, sft_format "deepseek", mask_prompt, ignore_id -100

``global_pool``: the released files say nothing (the class default "map" builds SigLIP's attention-pooling
head, stored as ``vision.attn_pool.*`` and never run). moelab writes ``""``: no head, so the released code
builds exactly the tensors moelab writes. Either value is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.common.jsonio import read_json
from moelab.common.run_dir_hint import check_not_run_dir
from moelab.errors import CheckpointError, ConfigError
from moelab.interop.hf_config import config_from_hf, config_to_hf
from moelab.model.vision_encoder import VisionConfig
from moelab.model.vl_config import ProcessorSettings, ProjectorSettings, VLConfig, max_tiles_of, release_order

MODEL_TYPE = "deepseek_vl_v2"
ARCHITECTURE = "DeepseekVLV2ForCausalLM"
PROCESSOR_CONFIG = "processor_config.json"
SO400M = VisionConfig()                   # SigLIP-SO400M/14@384, the released encoder
SO400M_NAME = "siglip_so400m_patch14_384"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<｜▁pad▁｜>"
#: Keys of the released language_config that belong to MLA only: null or 0 in the MHA model (VL2-Tiny).
_MLA_ONLY = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def mlp_ratio_for(width: int, mlp_width: int) -> float:
    """The shortest decimal r with ``int(width·r) == mlp_width`` (timm's rule; 1152, 4304 -> 3.7362)."""
    exact = mlp_width / width
    for digits in range(1, 12):
        step = 10.0 ** -digits
        for r in (round(exact, digits), round(exact, digits) + step):
            if int(width * r) == mlp_width:
                return r
    return exact


def vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    name = SO400M_NAME if v == SO400M else f"siglip_custom_patch{v.patch_size}_{v.image_size}"
    return {"model_type": "vision", "model_name": name, "image_size": v.image_size, "patch_size": v.patch_size,
            "width": v.hidden_size, "layers": v.num_hidden_layers, "heads": v.num_attention_heads,
            "mlp_ratio": mlp_ratio_for(v.hidden_size, v.intermediate_size), "global_pool": "", "ignore_head": True,
            "class_token": False, "num_classes": 0, "intermediate_size": v.intermediate_size,
            "layer_norm_eps": v.layer_norm_eps}


def vl_config_to_hf(cfg: VLConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of a VL checkpoint (module docstring)."""
    D = cfg.language.hidden_size
    out = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "language_config": config_to_hf(cfg.language, torch_dtype),
        "vision_config": vision_to_hf(cfg.vision),
        "projector_config": {"model_type": "mlp_projector", "projector_type": cfg.projector.projector_type,
                             "input_dim": cfg.vision.hidden_size, "n_embed": D, "depth": cfg.projector.depth,
                             "mlp_ratio": cfg.projector.mlp_ratio, "downsample_ratio": cfg.downsample,
                             "token_pooling": False},
        "tile_tag": "2D", "global_view_pos": "head",
        "candidate_resolutions": [list(wh) for wh in release_order(cfg.candidate_resolutions(), cfg.tile)],
        "torch_dtype": torch_dtype,
    }
    if cfg.image_token_id is not None:
        out["image_token_id"] = cfg.image_token_id
    return out


def processor_config(cfg: VLConfig) -> dict[str, Any]:
    """``processor_config.json``: the released ``DeepseekVLV2Processor``'s arguments."""
    p = cfg.processor
    return {"add_special_token": False,
            "candidate_resolutions": [list(wh) for wh in release_order(cfg.candidate_resolutions(), cfg.tile)],
            "downsample_ratio": cfg.downsample, "ignore_id": -100, "image_mean": list(p.image_mean),
            "image_std": list(p.image_std), "image_token": IMAGE_TOKEN, "mask_prompt": True, "normalize": True,
            "pad_token": PAD_TOKEN, "patch_size": cfg.patch, "processor_class": "DeepseekVLV2Processor",
            "sft_format": "deepseek"}


def _dict(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: '{key}' must be an object (got {value!r}); is this a DeepSeek-VL2 "
                              "config.json?")
    return value


def _int(d: dict, key: str, where: str, default: Any = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {key} must be an integer (got {value!r})")
    return value


def language_from_hf(raw: dict, where: str, **overrides):
    """The language model of a VL config.json. The released VL2-Tiny is MHA (use_mla false) with its MLA keys
    null or 0 and no rope_interleave: those keys are dropped, and RoPE rotates halves, as the release's
    LlamaAttention does."""
    lang = dict(raw)
    if lang.get("use_mla") is False:
        for key in _MLA_ONLY:
            if lang.get(key) in (None, 0):
                lang.pop(key, None)
        lang.setdefault("rope_interleave", False)
    return config_from_hf(lang, where=f"{where}: language_config", **overrides)


def vision_from_hf(v: dict, where: str) -> VisionConfig:
    where = f"{where}: vision_config"
    if v.get("class_token"):
        raise CheckpointError(f"{where}: class_token true is not DeepSeek-VL2's encoder (no CLS token)")
    if v.get("global_pool", "map") not in ("", "map"):
        raise CheckpointError(f"{where}: global_pool {v.get('global_pool')!r} is not supported (\"map\" or \"\")")
    C = _int(v, "width", where, 1024)                 # defaults: the release's VisionEncoderConfig
    if "intermediate_size" in v:
        mlp = _int(v, "intermediate_size", where)
    else:
        ratio = v.get("mlp_ratio", 4)
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise CheckpointError(f"{where}: mlp_ratio must be a number (got {ratio!r})")
        mlp = int(C * ratio)
    eps = v.get("layer_norm_eps", 1e-6)
    try:
        return VisionConfig(hidden_size=C, intermediate_size=mlp, num_hidden_layers=_int(v, "layers", where, 24),
                            num_attention_heads=_int(v, "heads", where, 16),
                            image_size=_int(v, "image_size", where, 384),
                            patch_size=_int(v, "patch_size", where, 16), layer_norm_eps=float(eps))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def projector_from_hf(p: dict, where: str, vision: VisionConfig, D: int) -> ProjectorSettings:
    where = f"{where}: projector_config"
    kind = p.get("projector_type", "downsample_mlp_gelu")
    if kind != "downsample_mlp_gelu" or p.get("token_pooling"):
        raise CheckpointError(f"{where}: projector_type {kind!r} (token_pooling {p.get('token_pooling', False)}) "
                              "is not DeepSeek-VL2's adaptor; moelab builds downsample_mlp_gelu only")
    depth, ratio = _int(p, "depth", where, 2), _int(p, "mlp_ratio", where, 1)
    if (depth, ratio) != (2, 1):
        raise CheckpointError(f"{where}: depth {depth}, mlp_ratio {ratio}: moelab's adaptor is the released one "
                              "(depth 2, mlp_ratio 1)")
    for key, want in (("input_dim", vision.hidden_size), ("n_embed", D)):
        if key in p and p[key] != want:
            raise CheckpointError(f"{where}: {key} {p[key]} does not match the model ({want}: "
                                  f"{'the encoder width' if key == 'input_dim' else 'the language model width'})")
    return ProjectorSettings(downsample_ratio=_int(p, "downsample_ratio", where, 2))


def image_token_from_tokenizer(directory: Path, token: str = IMAGE_TOKEN) -> int | None:
    """The id of ``token`` in ``directory/tokenizer.json``, or None (no file, or no such token)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).token_to_id(token)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
        raise CheckpointError(f"{path} is not a readable tokenizer ({type(e).__name__}: {str(e)[:120]})") from None


def read_vl_config(directory: str | Path, *, image_token_id: int | None = None, **overrides) -> VLConfig:
    """The :class:`VLConfig` of a VL checkpoint directory (config.json, processor_config.json if there, and the
    ``<image>`` id: ``image_token_id``, else config.json's, else its tokenizer.json's). ``overrides`` go to
    the language model (e.g. ``attn_impl="naive"``)."""
    directory = Path(directory)
    check_not_run_dir(directory)
    path = directory / "config.json"
    raw = read_json(path, CheckpointError, missing=f"{directory} has no config.json; a VL checkpoint directory "
                    "needs config.json plus model.safetensors (or sharded safetensors with an index)")
    where = str(path)
    if raw.get("model_type") != MODEL_TYPE:
        text_only = "language_config" not in raw and raw.get("model_type") in ("deepseek_v2", "deepseek_v3", "deepseek")
        hint = " — a language-model checkpoint: use `moelab generate` (or moelab.load in Python)" if text_only else ""
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r} is not a DeepSeek-VL2 checkpoint "
                              f"(model_type {MODEL_TYPE!r}){hint}")
    for key, want in (("tile_tag", "2D"), ("global_view_pos", "head")):
        if raw.get(key, want) != want:
            raise CheckpointError(f"{where}: {key} {raw[key]!r} is not supported (moelab assembles images as the "
                                  f"released models do: {key} {want!r})")
    language = language_from_hf(_dict(raw, "language_config", where), where, **overrides)
    vision = vision_from_hf(_dict(raw, "vision_config", where), where)
    projector = projector_from_hf(_dict(raw, "projector_config", where), where, vision, language.hidden_size)
    proc_raw = {}
    if (directory / PROCESSOR_CONFIG).is_file():
        proc_raw = read_json(directory / PROCESSOR_CONFIG, CheckpointError, missing="")
    for key, want in (("patch_size", vision.patch_size), ("downsample_ratio", projector.downsample_ratio)):
        if key in proc_raw and proc_raw[key] != want:
            raise CheckpointError(f"{directory / PROCESSOR_CONFIG}: {key} {proc_raw[key]} does not match "
                                  f"config.json ({want})")
    cands = raw.get("candidate_resolutions", proc_raw.get("candidate_resolutions", [[vision.image_size] * 2]))
    try:
        max_tiles = max_tiles_of(cands, vision.image_size)
        token = image_token_id
        if token is None:
            token = raw.get("image_token_id")
        if token is None:
            token = image_token_from_tokenizer(directory, proc_raw.get("image_token", IMAGE_TOKEN))
        processor = ProcessorSettings(
            max_tiles=max_tiles, image_mean=tuple(proc_raw.get("image_mean", (0.5,) * 3)),
            image_std=tuple(proc_raw.get("image_std", (0.5,) * 3)))
        return VLConfig(language, vision, projector, processor, image_token_id=token)
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def is_vl_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (a directory, or its config.json) holds a config.json of model_type deepseek_vl_v2."""
    p = Path(path)
    cfg = p if p.name == "config.json" and p.is_file() else p / "config.json"
    try:
        return read_json(cfg, CheckpointError, missing="").get("model_type") == MODEL_TYPE
    except (CheckpointError, OSError):
        return False


def vl_config_of(path: str | Path) -> VLConfig | None:
    """The :class:`VLConfig` of a VL TOML (a ``[vision]`` section), a VL checkpoint directory or its config.json;
    None for anything else (a language model's config, a path that does not exist)."""
    from moelab.model.vl_config import is_vl_toml, load_vl_config

    p = Path(path)
    if p.is_dir() or p.name == "config.json":
        directory = p if p.is_dir() else p.parent
        return read_vl_config(directory) if is_vl_checkpoint(directory) else None
    return load_vl_config(p) if p.is_file() and is_vl_toml(p) else None


__all__ = ["ARCHITECTURE", "IMAGE_TOKEN", "MODEL_TYPE", "PROCESSOR_CONFIG", "SO400M_NAME", "image_token_from_tokenizer",
           "is_vl_checkpoint", "language_from_hf", "mlp_ratio_for", "processor_config", "projector_from_hf",
           "read_vl_config", "vision_from_hf", "vision_to_hf", "vl_config_of", "vl_config_to_hf"]
