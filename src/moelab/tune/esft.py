"""ESFT — Expert-Specialized Fine-Tuning (docs/methods.md §5, arXiv 2407.01906).

Score every routed expert on task data, keep the most relevant experts of each MoE layer, train only
those, and ship them as a small file that merges back into the base checkpoint::

    summary = score_experts(model, batches)               # how much each expert is used on the task
    cfg = select_experts(summary, "token", p=0.2)         # {"experts": {"1": [8, 26, 55, 6, 20], ...}, ...}
    info = apply_esft(model, cfg)                         # only the selected experts are trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    ...                                                   # train
    save_esft(model, cfg, "out/esft")                     # expert_cfg.json + model.safetensors (trained experts)
    merge_esft("base/", "out/esft", "out/merged")         # a full Hugging Face checkpoint

Legend: B batch, T sequence length, N = B·T tokens, E routed experts, K experts per token,
H hidden, I expert width, n experts selected in a layer. Layers are named by their decoder-layer
index as a string ("1".."26" for DeepSeek-V2-Lite, whose layer 0 is dense).

**Scores.** For MoE layer l and routed expert i, over N_s sequences j of L_j tokens::

    gate   g_i^l = (1/N_s) Σ_j (1/L_j) Σ_k g^l_{i,k}     g = the weight the MoE applies to expert i's
                                                          output for token k (0 if i was not chosen)
    token  r_i^l = (1/N_s) Σ_j (1/L_j) Σ_k 1[i chosen for k] / K

The gate is the value the block really multiplies by, i.e. after ``norm_topk_prob`` renormalisation and
``routed_scaling_factor`` (V2-Lite: softmax probabilities, not renormalised, scale 1, so a layer's gate
scores sum to the mean top-6 probability mass, ≈0.3–0.5). Every token picks K experts, so a layer's
token scores sum to 1 by construction. Sequences are packed (no padding): every position counts.

**Normalisation** (``norm``, the ``esft_score_norm`` setting, [UNCERTAIN] in docs/methods.md §5):

* ``per_layer`` (default) — the paper's definition and what the released ``summary.json`` files hold:
  nothing is rescaled. Token rows sum to 1 per layer by construction; gate rows stay raw means (so the
  gate threshold p is on raw means, p = 0.1 in the paper).
* ``legacy_across_layers`` — the released ``generate_expert_config.py``: each score is divided by the
  same expert's sum over all MoE layers (``scores / scores.sum(axis=0)`` on a ``[layers, E]`` array);
  both tables are rescaled. An expert that no layer ever chose scores 0 (the script would give NaN).

**Selection.** Per layer, experts sorted by score (descending; equal scores keep ascending expert id —
a stable sort of the id-ordered row, which reproduces all four released configurations) are added
while the running sum (plain float addition in that order) is below p: the expert that reaches or
crosses p is included. Shared experts are never candidates.

**Training.** :func:`apply_esft` freezes every parameter, then makes the selected routed experts
trainable through a parametrization of the stacked ``experts.gate_up_proj [E, 2I, H]`` /
``experts.down_proj [E, H, I]``: the frozen stacked tensor stays where it was
(``experts.parametrizations.<name>.original``) and a trainable ``rows [n, ...]`` tensor
(``experts.parametrizations.<name>.0.rows``) is scattered into it on each forward. The optimizer
therefore sees exactly the selected experts' weights: AdamW's weight decay and moments never touch a
frozen expert. Routing stays free — the router still sends tokens to every expert; the frozen ones
simply do not change. Switches (ESFT Table 3, as in the released ``to_esft``):

* ``shared_experts`` — the layer's shared experts train too;
* ``non_expert_modules`` — everything that is not a routed or shared expert trains too: attention,
  norms, embeddings, LM head, the dense FFN layers and the routers' weights.

The loss-free balancing bias ``e_score_correction_bias`` is a buffer, never a trainable parameter here;
ESFT keeps it fixed (u = 0), which is the training loop's ``balance`` setting, not this module's.
While ESFT is applied, ``model.state_dict()`` holds the parametrization names; :func:`remove_esft` folds
the trained rows back into the plain stacked parameters (then ``moelab.save`` works as usual).

**On disk.** An ESFT directory holds ``expert_cfg.json`` (the configuration above) and
``model.safetensors`` with only the trained tensors under the base checkpoint's Hugging Face names
(``model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight``, plus the shared-expert and
non-expert tensors when those switches are on). It loads strictly (:func:`load_esft_into`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from moelab.common.atomic import CHECKPOINT, ESFT, check_output_dir, write_dir
from moelab.errors import CheckpointError, ConfigError, DataError, did_you_mean
from moelab.model.moe import DeepSeekMoE
from moelab.model.transformer import DeepSeekForCausalLM

SCORE_NORMS = ("per_layer", "legacy_across_layers")
SCORE_KINDS = ("token", "gate")
EXPERT_CONFIG = "expert_cfg.json"
WEIGHTS = "model.safetensors"
_STACKED = ("gate_up_proj", "down_proj")
_CONFIG_KEYS = ("experts", "shared_experts", "non_expert_modules")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ----------------------------------------------------------------------------------------------
# model helpers
# ----------------------------------------------------------------------------------------------
def _check_model(model) -> DeepSeekForCausalLM:
    if not isinstance(model, DeepSeekForCausalLM):
        raise ConfigError(f"ESFT works on moelab models, got {type(model).__name__}; load the checkpoint "
                          "with moelab.load")
    return model


def moe_layers(model: DeepSeekForCausalLM) -> dict[int, DeepSeekMoE]:
    """Decoder-layer index -> its :class:`DeepSeekMoE` block (dense layers are left out).

    Raises ConfigError when the model has no routed experts at all.
    """
    _check_model(model)
    layers = {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, DeepSeekMoE)}
    if not layers:
        cfg = model.config
        raise ConfigError(
            f"ESFT needs routed experts; this model (n_routed_experts={cfg.n_routed_experts}, "
            f"{cfg.num_hidden_layers} layers, first_k_dense_replace={cfg.first_k_dense_replace}) has none. "
            "Use a mixture-of-experts checkpoint such as DeepSeek-V2-Lite")
    return layers


def _is_expert_name(name: str) -> bool:
    return ".mlp.experts." in name or ".mlp.shared_experts." in name


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def score_experts(model: DeepSeekForCausalLM, batches: Iterable[torch.Tensor], progress: bool = False,
                  norm: str = "per_layer") -> dict:
    """Token and gate relevance scores of every routed expert on ``batches`` (see the module docstring).

    Args:
        model: a moelab MoE model; it runs in eval mode under ``torch.no_grad`` (its mode is restored).
        batches: int64 token ids ``[B, T]`` (or ``[T]``), packed sequences without padding; each row
            is one sequence j of length L_j = T.
        progress: show a progress bar on stderr.
        norm: ``per_layer`` or ``legacy_across_layers``.

    Returns ``{"token_scores": {layer: {expert: float}}, "gate_scores": {...}, "meta": {...}}`` with
    string keys ("1", "0"...), layers in model order, experts 0..E-1; ``meta`` records the number of
    sequences and tokens, K, E and the normalisation.
    """
    if norm not in SCORE_NORMS:
        raise ConfigError(f"unknown score normalisation {norm!r}{did_you_mean(str(norm), SCORE_NORMS)}; "
                          f"use one of {', '.join(SCORE_NORMS)}")
    layers = moe_layers(model)
    cfg = model.config
    E, K, V = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.vocab_size
    device = model.device
    gate_sum = {i: torch.zeros(E, dtype=torch.float64, device=device) for i in layers}   # Σ_j per-seq means
    token_sum = {i: torch.zeros(E, dtype=torch.float64, device=device) for i in layers}

    def observe(moe: DeepSeekMoE, routing) -> None:
        N = routing.indices.shape[0]
        B, T = routing.batch_shape if routing.batch_shape and len(routing.batch_shape) == 2 else (1, N)
        seq_N = torch.arange(N, device=routing.indices.device) // T                    # sequence of each token
        flat = (seq_N[:, None] * E + routing.indices).reshape(-1)                       # [N·K] in [0, B·E)
        weights = routing.weights.detach().reshape(-1).to(torch.float64)
        g_BE = torch.bincount(flat, weights=weights, minlength=B * E).view(B, E)
        c_BE = torch.bincount(flat, minlength=B * E).view(B, E).to(torch.float64)
        gate_sum[moe.layer_idx] += g_BE.sum(0).to(device) / T
        token_sum[moe.layer_idx] += c_BE.sum(0).to(device) / (T * K)

    n_seq = n_tok = 0
    was_training = model.training
    for moe in layers.values():
        moe.routing_observers.append(observe)
    try:
        model.eval()
        with torch.no_grad(), _bar(batches, progress, "scoring experts") as items:
            for ids in items:
                ids = _check_ids(ids, V)
                model.model(ids.to(device))          # the backbone is enough: no logits needed
                n_seq += ids.shape[0]
                n_tok += ids.numel()
    finally:
        for moe in layers.values():
            moe.routing_observers[:] = [fn for fn in moe.routing_observers if fn is not observe]
        model.train(was_training)
    if n_seq == 0:
        raise DataError("no sequences to score: the data gave no batches; give at least one sequence")

    order = sorted(layers)
    token = torch.stack([token_sum[i] for i in order]).cpu() / n_seq             # [layers, E]
    gate = torch.stack([gate_sum[i] for i in order]).cpu() / n_seq
    if norm == "legacy_across_layers":
        token, gate = _across_layers(token), _across_layers(gate)

    def table(x: torch.Tensor) -> dict:
        return {str(layer): {str(e): float(v) for e, v in enumerate(row.tolist())}
                for layer, row in zip(order, x, strict=True)}

    return {"token_scores": table(token), "gate_scores": table(gate),
            "meta": {"norm": norm, "sequences": n_seq, "tokens": n_tok, "n_routed_experts": E, "top_k": K}}


def _across_layers(x: torch.Tensor) -> torch.Tensor:
    """``x / x.sum(0)`` for ``[layers, E]``; an all-zero column stays 0."""
    col = x.sum(0, keepdim=True)
    return torch.where(col > 0, x / col.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _check_ids(ids, vocab: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"a batch must be a torch tensor of token ids [B, T], got {type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(f"a batch must be token ids of shape [B, T] with T >= 1, got shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError(f"token ids must be integers, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise DataError(f"token id {hi if hi >= vocab else lo} is outside the model's vocabulary (0..{vocab - 1}); "
                        "was the data tokenized with this model's tokenizer?")
    return ids.long()


class _bar:
    """Context manager yielding ``items``, wrapped in a rich progress bar on stderr when ``enabled``."""

    def __init__(self, items, enabled: bool, what: str):
        self.items, self.enabled, self.what, self.progress = items, enabled, what, None

    def __enter__(self):
        if not self.enabled:
            return iter(self.items)
        from rich.console import Console
        from rich.progress import Progress

        total = len(self.items) if hasattr(self.items, "__len__") else None
        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.progress.__enter__()
        return self.progress.track(self.items, total=total, description=self.what)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


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
    if not p.is_file():
        raise DataError(f"expert-score summary not found: {p}; create one with `moelab esft score`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is not valid JSON ({e}); write it again with `moelab esft score`") from None
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
    if not p.is_file():
        raise ConfigError(f"expert config not found: {p}; create one with `moelab esft select`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid JSON ({e}); write it again with `moelab esft select`") from None
    return validate_expert_config(data, model, str(p))


# ----------------------------------------------------------------------------------------------
# training: only the selected experts
# ----------------------------------------------------------------------------------------------
class SelectedRows(nn.Module):
    """Parametrization of a stacked expert tensor: frozen base ``[E, ...]`` -> the base with rows ``ids``
    replaced by the trainable ``rows`` ``[n, ...]`` (``index_copy``, differentiable in ``rows`` only).

    While its experts module runs a forward pass the result is computed once and reused (the ``loop``
    kernel reads one expert at a time); outside a forward it is recomputed on every access.
    """

    def __init__(self, base: torch.Tensor, ids: list[int]):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.device), persistent=False)
        self.rows = nn.Parameter(base.detach().index_select(0, self.ids).clone())
        self._cache: torch.Tensor | None = None
        self._caching = False

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self._cache is not None:
            return self._cache
        w = base.index_copy(0, self.ids, self.rows)
        if self._caching:
            self._cache = w
        return w


@dataclass
class _EsftState:
    config: dict
    requires_grad: dict[str, bool]
    hooks: list = field(default_factory=list)


@dataclass
class EsftInfo:
    """What :func:`apply_esft` made trainable."""

    experts: dict[int, list[int]]          # decoder layer -> trainable routed expert ids
    shared_experts: bool
    non_expert_modules: bool
    n_trainable: int                       # trainable parameters (elements)
    n_total: int                           # parameters of the model
    experts_per_layer: dict[int, int]      # decoder layer -> number of trainable experts
    n_experts: int                         # routed experts per layer (E)

    @property
    def summary(self) -> str:
        counts = list(self.experts_per_layer.values())
        mean = sum(counts) / len(counts) if counts else 0.0
        extra = [s for s, on in (("shared experts", self.shared_experts),
                                 ("non-expert modules", self.non_expert_modules)) if on]
        return (f"ESFT: {sum(counts)} of {len(counts) * self.n_experts} routed experts trainable "
                f"({mean:.2f} per layer over {len(counts)} MoE layers)"
                + (f" + {' + '.join(extra)}" if extra else "")
                + f"; {self.n_trainable:,} of {self.n_total:,} parameters "
                  f"({100 * self.n_trainable / max(self.n_total, 1):.2f}%)")

    def __str__(self) -> str:
        return self.summary


def _esft_state(model) -> _EsftState | None:
    return getattr(model, "_esft_state", None)


def apply_esft(model: DeepSeekForCausalLM, expert_config: dict) -> EsftInfo:
    """Freeze ``model`` except the experts (and switched-on modules) of ``expert_config``.

    Afterwards ``[p for p in model.parameters() if p.requires_grad]`` is exactly what trains: one
    ``rows`` tensor ``[n, 2I, H]`` and one ``[n, H, I]`` per layer with selected experts, plus the
    shared-expert / non-expert parameters when switched on. Layers missing from the configuration
    (or listed with ``[]``) train no routed expert. Undo with :func:`remove_esft`.
    """
    _check_model(model)
    if _esft_state(model) is not None:
        raise ConfigError("ESFT is already applied to this model; call remove_esft(model) first")
    cfg = validate_expert_config(expert_config, model)
    layers = moe_layers(model)
    n_total = sum(p.numel() for p in model.parameters())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    if not any(cfg["experts"].values()) and not cfg["shared_experts"] and not cfg["non_expert_modules"]:
        raise ConfigError("the expert config selects no expert and no other module: nothing would train. "
                          "Select experts with `moelab esft select` (a larger --p selects more)")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg["non_expert_modules"]:
        for name, p in model.named_parameters():
            if not _is_expert_name(name):
                p.requires_grad_(True)
    if cfg["shared_experts"]:
        for moe in layers.values():
            if moe.shared_experts is not None:
                moe.shared_experts.requires_grad_(True)
    state = _EsftState(cfg, flags)
    model._esft_state = state
    for layer, ids in cfg["experts"].items():
        if ids:
            state.hooks += _parametrize(layers[int(layer)].experts, ids)
    per_layer = {i: len(cfg["experts"].get(str(i), [])) for i in layers}
    return EsftInfo(experts={int(k): list(v) for k, v in cfg["experts"].items() if v},
                    shared_experts=cfg["shared_experts"], non_expert_modules=cfg["non_expert_modules"],
                    n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                    n_total=n_total, experts_per_layer=per_layer, n_experts=model.config.n_routed_experts)


def _parametrize(experts: nn.Module, ids: list[int]) -> list:
    for name in _STACKED:
        base = getattr(experts, name)
        base.requires_grad_(False)
        parametrize.register_parametrization(experts, name, SelectedRows(base, ids))
    rows = [experts.parametrizations[name][0] for name in _STACKED]

    def start(module, args):
        for r in rows:
            r._caching, r._cache = True, None

    def stop(module, args, output):
        for r in rows:
            r._caching, r._cache = False, None

    return [experts.register_forward_pre_hook(start), experts.register_forward_hook(stop, always_call=True)]


def remove_esft(model: DeepSeekForCausalLM) -> None:
    """Fold the trained experts into the plain stacked parameters and undo :func:`apply_esft`.

    The model's parameters get their names and ``requires_grad`` flags back, with the trained values;
    ``moelab.save(model, ...)`` then writes a full checkpoint. A model without ESFT is left as it is.
    """
    state = _esft_state(model)
    if state is None:
        return
    for h in state.hooks:
        h.remove()
    for moe in moe_layers(model).values():
        experts = moe.experts
        if not parametrize.is_parametrized(experts):
            continue
        for name in _STACKED:
            plist = experts.parametrizations[name]
            sel = plist[0]
            with torch.no_grad():
                plist.original.index_copy_(0, sel.ids, sel.rows.detach().to(plist.original.dtype))
            parametrize.remove_parametrizations(experts, name, leave_parametrized=False)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    del model._esft_state


# ----------------------------------------------------------------------------------------------
# saving, loading, merging
# ----------------------------------------------------------------------------------------------
def _expert_weights(experts: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s current (gate_up ``[2I, H]``, down ``[H, I]``), read without building the stack."""
    out = []
    for name in _STACKED:
        if parametrize.is_parametrized(experts, name):
            plist = experts.parametrizations[name]
            sel = plist[0]
            hit = (sel.ids == e).nonzero()
            out.append(sel.rows[int(hit[0, 0])] if hit.numel() else plist.original[e])
        else:
            out.append(getattr(experts, name)[e])
    return out[0], out[1]


def _config_for(model: DeepSeekForCausalLM, expert_config: dict | None) -> dict:
    state = _esft_state(model)
    if expert_config is None:
        if state is None:
            raise ConfigError("pass the expert config: ESFT is not applied to this model, so it does not say "
                              "which experts were trained")
        return state.config
    cfg = validate_expert_config(expert_config, model)
    if state is not None and cfg != state.config:
        raise ConfigError("the expert config differs from the one applied to this model (apply_esft); "
                          "pass the same config, or None to use the applied one")
    return cfg


def esft_state_dict(model: DeepSeekForCausalLM, expert_config: dict | None = None) -> dict[str, torch.Tensor]:
    """The trained routed experts under Hugging Face names, split from the stacked tensors.

    ``{"model.layers.{L}.mlp.experts.{e}.gate_proj.weight": [I, H], ...up_proj...: [I, H],
    ...down_proj...: [H, I]}`` for exactly the experts of ``expert_config`` (default: the config given to
    :func:`apply_esft`). Tensors are detached copies.
    """
    cfg = _config_for(model, expert_config)
    layers = moe_layers(model)
    I = model.config.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in sorted(cfg["experts"], key=int):
            experts = layers[int(layer)].experts
            for e in cfg["experts"][layer]:
                gate_up, down = _expert_weights(experts, e)
                prefix = f"model.layers.{layer}.mlp.experts.{e}"
                out[f"{prefix}.gate_proj.weight"] = gate_up[:I].detach().clone()
                out[f"{prefix}.up_proj.weight"] = gate_up[I:].detach().clone()
                out[f"{prefix}.down_proj.weight"] = down.detach().clone()
    return out


def _module_tensors(model: DeepSeekForCausalLM, cfg: dict) -> dict[str, torch.Tensor]:
    """Shared-expert and non-expert parameters under their (Hugging Face) names, as switched on."""
    out = {}
    for name, p in model.named_parameters():            # tied LM head: listed once, as the embedding
        shared = ".mlp.shared_experts." in name
        if (shared and cfg["shared_experts"]) or (not _is_expert_name(name) and cfg["non_expert_modules"]):
            out[name] = p.detach().clone()
    return out


def save_esft(model: DeepSeekForCausalLM, expert_config: dict | None, out_dir: str | os.PathLike, *,
              overwrite: bool = True) -> Path:
    """Write an ESFT directory: ``expert_cfg.json`` + ``model.safetensors`` with only the trained tensors.

    Written to a temporary sibling directory renamed into place. An existing ``out_dir`` is replaced only
    if it holds an ESFT result and nothing else, and ``overwrite`` is true (:mod:`moelab.common.atomic`).
    """
    cfg = _config_for(model, expert_config)
    tensors = {k: v.to("cpu").contiguous() for k, v in
               (esft_state_dict(model, cfg) | _module_tensors(model, cfg)).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / EXPERT_CONFIG).write_text(json.dumps(cfg) + "\n", encoding="utf-8")

    return write_dir(Path(out_dir), write, kind=ESFT, overwrite=overwrite)


def load_esft_into(model: DeepSeekForCausalLM, esft_dir: str | os.PathLike) -> dict:
    """Copy an ESFT directory's tensors into ``model`` (in place), strictly; returns its expert config.

    Every tensor must name a parameter of the model with the same shape, every expert the config lists
    must be present with all three projections, and nothing else may be there. Load before
    :func:`apply_esft` (to continue training, apply the config afterwards).
    """
    from moelab.interop.checkpoint import iter_tensors, weight_files

    _check_model(model)
    d = Path(esft_dir)
    if not d.is_dir():
        raise CheckpointError(f"ESFT directory not found: {d} (expected {EXPERT_CONFIG} + {WEIGHTS})")
    if _esft_state(model) is not None:
        raise ConfigError("ESFT is applied to this model; load the ESFT weights first, then apply_esft "
                          "(or call remove_esft(model) before loading)")
    cfg = read_expert_config(d / EXPERT_CONFIG, model)
    layers = moe_layers(model)
    mcfg = model.config
    I, H = mcfg.moe_intermediate_size, mcfg.hidden_size
    expected = {(int(layer), e, proj) for layer, ids in cfg["experts"].items() for e in ids
                for proj in ("gate_proj", "up_proj", "down_proj")}
    modules = {name: p for name, p in model.named_parameters() if ".mlp.experts." not in name}
    wanted = set(_module_tensors(model, cfg))
    seen_experts: set[tuple[int, int, str]] = set()
    seen: set[str] = set()
    for name, t, path in iter_tensors(weight_files(d)):
        m = _EXPERT_KEY.match(name)
        if m:
            L, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            if L not in layers or e >= layers[L].experts.n_experts:
                raise CheckpointError(f"{path.name}: {name} does not exist in the base model "
                                      f"({len(layers)} MoE layers, {mcfg.n_routed_experts} experts each); "
                                      "was it trained from another base?")
            if (L, e, proj) not in expected:
                raise CheckpointError(f"{path.name}: {name} is an expert that {EXPERT_CONFIG} does not select "
                                      f"(layer {L} trains {cfg['experts'].get(str(L), [])}); the directory "
                                      "is inconsistent, save it again")
            want = (H, I) if proj == "down_proj" else (I, H)
            if tuple(t.shape) != want:
                raise CheckpointError(f"{path.name}: {name} has shape {list(t.shape)}, the base model expects "
                                      f"{list(want)}; was it trained from another base?")
            experts = layers[L].experts
            with torch.no_grad():
                if proj == "down_proj":
                    experts.down_proj[e].copy_(t)
                else:
                    rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                    experts.gate_up_proj[e, rows].copy_(t)
            seen_experts.add((L, e, proj))
            continue
        if name not in modules:
            raise CheckpointError(f"{path.name}: {name} does not exist in the base model; was it trained from "
                                  "another base?")
        if name not in wanted:
            switch = "shared_experts" if ".mlp.shared_experts." in name else "non_expert_modules"
            raise CheckpointError(f"{path.name}: holds {name}, but {EXPERT_CONFIG} has {switch} false; "
                                  "the directory is inconsistent, save it again")
        target = modules[name]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{path.name}: {name} has shape {list(t.shape)}, the base model expects "
                                  f"{list(target.shape)}; was it trained from another base?")
        with torch.no_grad():
            target.copy_(t)
        seen.add(name)
    missing = [f"model.layers.{L}.mlp.experts.{e}.{proj}.weight" for L, e, proj in sorted(expected - seen_experts)]
    missing += sorted(wanted - seen)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{d} is missing tensor(s) its {EXPERT_CONFIG} calls for: "
                              f"{', '.join(missing[:3])}{more}; save it again with save_esft")
    return cfg


def merge_esft(base_dir: str | os.PathLike, esft_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
               dtype: torch.dtype | str | None = None, progress: bool = False, overwrite: bool = False) -> Path:
    """Write a full Hugging Face checkpoint: the base with the ESFT tensors in place.

    The base is read with ``moelab.load`` (its stored dtype unless ``dtype``), the ESFT directory strictly
    (:func:`load_esft_into`), and the result written with ``moelab.save`` (atomically), with the base's
    tokenizer files when it has them. ``out_dir`` must differ from both inputs; an existing one is
    replaced only if it is a moelab checkpoint and ``overwrite`` is true.
    """
    from moelab.interop.checkpoint import load, save

    base, esft, out = Path(base_dir), Path(esft_dir), Path(out_dir)
    for src, what in ((base, "base checkpoint"), (esft, "ESFT directory")):
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise CheckpointError(f"--out {out} is the {what}; write the merged checkpoint to a new directory")
    check_output_dir(out, CHECKPOINT, overwrite)
    model = load(base, dtype=dtype, progress=progress)
    load_esft_into(model, esft)
    tokenizer = base if (base / "tokenizer.json").is_file() else None
    return save(model, out, tokenizer=tokenizer, overwrite=overwrite)
