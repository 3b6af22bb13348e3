"""ESFT selection: score summaries on disk, choosing the experts to train, and expert configurations.

A summary is ``{"token_scores": {layer: {expert: score}}, "gate_scores": {...}, "meta": {...}}`` with
string keys ("1", "0"...) (see :mod:`~moelab.tune.esft.scores`). An expert configuration (the
``expert_cfg.json`` format) is ``{"experts": {layer: [expert ids]}, "shared_experts": bool,
"non_expert_modules": bool}``.

**Selection.** Per layer, experts sorted by score (descending; equal scores keep ascending expert id —
a stable sort of the id-ordered row, which reproduces all four released configurations) are added
while the running sum (plain float addition in that order) is below p: the expert that reaches or
crosses p is included. Shared experts are never candidates.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from moelab.common.jsonio import read_json
from moelab.errors import ConfigError, DataError, did_you_mean
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.esft.layers import moe_layers
from moelab.tune.esft.scores import SCORE_KINDS

_CONFIG_KEYS = ("experts", "shared_experts", "non_expert_modules")


# ----------------------------------------------------------------------------------------------
# summary files
# ----------------------------------------------------------------------------------------------
def _atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling file (the old file stays until the end)."""
    out = Path(path)
    if out.is_dir():
        raise DataError(f"{out} is a directory; give a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _int_key(key, what: str, where: str, error=DataError) -> int:
    if not isinstance(key, str) or not key.isdigit() or str(int(key)) != key:
        raise error(f"{where}: {what} key {key!r} is not a non-negative integer written as a string "
                    f"(like \"1\")")
    return int(key)


def validate_summary(summary, where: str = "summary") -> dict:
    """Check the structure of an expert-score summary; returns it. DataError naming the bad entry."""
    if not isinstance(summary, dict):
        raise DataError(f"{where}: expected a JSON object with token_scores and gate_scores, "
                        f"got {type(summary).__name__}")
    for kind in SCORE_KINDS:
        key = f"{kind}_scores"
        table = summary.get(key)
        if not isinstance(table, dict) or not table:
            raise DataError(f"{where}: '{key}' is missing or empty; it must map layer -> {{expert: score}} "
                            "(write it with `moelab esft score`)")
        for layer, row in table.items():
            _int_key(layer, "layer", f"{where} {key}")
            if not isinstance(row, dict) or not row:
                raise DataError(f"{where}: {key}[{layer!r}] must be a non-empty object {{expert: score}}")
            for e, v in row.items():
                _int_key(e, "expert", f"{where} {key}[{layer!r}]")
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                    raise DataError(f"{where}: {key}[{layer!r}][{e!r}] = {v!r} is not a finite score >= 0")
    return summary


def write_summary(summary: dict, path: str | os.PathLike) -> Path:
    """Write a score summary as JSON, atomically (a temporary file renamed into place)."""
    validate_summary(summary, "summary to write")
    return _atomic_write_text(path, json.dumps(summary) + "\n")


def read_summary(path: str | os.PathLike) -> dict:
    """Read a summary written by :func:`write_summary` (or a released ESFT ``summary.json``)."""
    p = Path(path)
    data = read_json(p, DataError, missing=f"expert-score summary not found: {p}; create one with `moelab esft score`",
                     hint="write it again with `moelab esft score`", want_object=False)
    return validate_summary(data, str(p))


# ----------------------------------------------------------------------------------------------
# selection and expert configurations
# ----------------------------------------------------------------------------------------------
def select_experts(summary: dict, score: str = "token", p: float = 0.2, train_shared_experts: bool = False,
                   train_non_expert_modules: bool = False) -> dict:
    """The experts to train in each layer: highest scores first until their sum reaches ``p``.

    Ties keep ascending expert id; the expert that reaches or crosses ``p`` is included; a layer whose
    scores sum to less than ``p`` trains all its experts. Returns ``{"experts": {layer: [ids in
    selection order]}, "shared_experts": bool, "non_expert_modules": bool}`` (layers in summary order).
    """
    if score not in SCORE_KINDS:
        raise ConfigError(f"unknown score {score!r}{did_you_mean(str(score), SCORE_KINDS)}; use 'token' or 'gate'")
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or not 0 < p <= 1:
        raise ConfigError(f"p must be a number in (0, 1], got {p!r}: the share of the layer's score the "
                          "selected experts must reach (0.2 for token scores, 0.1 for raw gate scores)")
    table = validate_summary(summary)[f"{score}_scores"]
    experts = {}
    for layer, row in table.items():
        ranked = sorted((int(e), float(s)) for e, s in row.items())          # ascending id ...
        ranked.sort(key=lambda t: t[1], reverse=True)                         # ... kept on ties (stable)
        chosen, total = [], 0.0
        for e, s in ranked:
            if total >= p:
                break
            chosen.append(e)
            total += s
        experts[layer] = chosen
    return {"experts": experts, "shared_experts": bool(train_shared_experts),
            "non_expert_modules": bool(train_non_expert_modules)}


def validate_expert_config(config, model: DeepSeekForCausalLM | None = None, where: str = "expert config") -> dict:
    """Check an expert configuration (and, given ``model``, that it fits it); returns a normalised copy.

    ConfigError names the bad layer or expert id: layer keys must be MoE decoder layers of the model,
    ids in 0..E-1 without duplicates.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object with 'experts', got {type(config).__name__}")
    for key in config:
        if key not in _CONFIG_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(str(key), _CONFIG_KEYS)}; "
                              f"known keys: {', '.join(_CONFIG_KEYS)}")
    experts = config.get("experts")
    if not isinstance(experts, dict):
        raise ConfigError(f"{where}: 'experts' must map layer -> [expert ids], e.g. {{\"1\": [8, 26]}}")
    flags = {}
    for key in ("shared_experts", "non_expert_modules"):
        v = config.get(key, False)
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {v!r}")
        flags[key] = v
    layers = moe_layers(model) if model is not None else None
    out: dict[str, list[int]] = {}
    for layer, ids in experts.items():
        L = _int_key(layer, "layer", where, ConfigError)
        if not isinstance(ids, list) or any(isinstance(e, bool) or not isinstance(e, int) for e in ids):
            raise ConfigError(f"{where}: layer {layer} must list integer expert ids, got {ids!r}")
        seen = set()
        for e in ids:
            if e < 0:
                raise ConfigError(f"{where}: layer {layer} lists expert {e}; expert ids start at 0")
            if e in seen:
                raise ConfigError(f"{where}: layer {layer} lists expert {e} twice; list each expert once")
            seen.add(e)
        if layers is not None:
            cfg = model.config
            if L >= cfg.num_hidden_layers:
                raise ConfigError(f"{where}: layer {layer} does not exist; the model has {cfg.num_hidden_layers} "
                                  f"decoder layers (0..{cfg.num_hidden_layers - 1}). Was this config made for "
                                  "another model?")
            if L not in layers:
                moe = ", ".join(map(str, sorted(layers)))
                raise ConfigError(f"{where}: layer {layer} is a dense layer without routed experts "
                                  f"(first_k_dense_replace={cfg.first_k_dense_replace}); MoE layers: {moe}")
            E = layers[L].experts.n_experts
            bad = [e for e in ids if e >= E]
            if bad:
                raise ConfigError(f"{where}: layer {layer} lists expert {bad[0]}, but the model has {E} routed "
                                  f"experts (ids 0..{E - 1})")
        out[layer] = list(ids)
    if layers is not None and flags["shared_experts"] and all(m.shared_experts is None for m in layers.values()):
        raise ConfigError(f"{where}: shared_experts is true but the model has no shared experts; set it to false")
    return {"experts": out, **flags}


def write_expert_config(config: dict, path: str | os.PathLike, model: DeepSeekForCausalLM | None = None) -> Path:
    """Validate and write an expert configuration (``expert_cfg.json`` format), atomically."""
    cfg = validate_expert_config(config, model, "expert config to write")
    return _atomic_write_text(path, json.dumps(cfg) + "\n")


def read_expert_config(path: str | os.PathLike, model: DeepSeekForCausalLM | None = None) -> dict:
    """Read and validate an ``expert_cfg.json`` (against ``model`` when given)."""
    p = Path(path)
    data = read_json(p, ConfigError, missing=f"expert config not found: {p}; create one with `moelab esft select`",
                     hint="write it again with `moelab esft select`", want_object=False)
    return validate_expert_config(data, model, str(p))
