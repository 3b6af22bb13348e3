"""Routing statistics of a DeepSeekMoE model: how each layer spreads tokens over its routed experts, and
how much two datasets share experts (docs/methods.md §5: tasks concentrate on few, different experts).

    model, tok = load_causal_lm("runs/demo/model")
    stats = [collect_routing(model, load_samples(d, tok, 64, 256, vocab_size=512), name=d)
             for d in ("runs/data/shakespeare", "runs/tasks/arith-train.jsonl")]
    report = routing_report(stats, coverage=0.5)      # the JSON written by `moelab analyze routing`
    plot_routing_load(stats, "out/routing_load.png"); plot_routing_overlap(report, "out/routing_overlap.png")

Legend: E routed experts, K experts per token, N tokens, L MoE layers, D datasets.

Per dataset, MoE layer l and routed expert e, counted over every (non-padding) token:

* ``load[l, e]``  = #{tokens routed to e} / (N·K)   — the share of the layer's K·N routing slots (Σ_e = 1).
  This is ESFT's token score (§5) over the whole dataset instead of averaged per sequence.
* ``gate[l, e]``  = Σ_tokens g_{e,t} / Σ_tokens Σ_e g_{e,t} — the share of the gate mass (Σ_e = 1).
* ``top_n``       = the summed load of the n most used experts (n = 1, K, 2K by default): 1.0 means all
  routing goes to n experts, n/E means perfectly balanced.
* ``entropy``     = H(load) / ln E ∈ [0, 1] (1 = uniform over all E experts).
* ``cover_set``   = the smallest set of experts whose load reaches ``coverage`` (0.5): experts sorted by
  load (descending, ties by id) and added until the running sum reaches it — ESFT's selection rule with
  p = coverage.
* ``max_vio``     = max_e load / (1/E) − 1 (MaxVio of §3 on this data; 0 = balanced).

Between two datasets a and b, per layer (and averaged over layers):

* ``jaccard`` = |C_a ∩ C_b| / |C_a ∪ C_b| of their cover sets;
* ``cosine``  = load_a · load_b / (‖load_a‖ ‖load_b‖);
* ``js``      = Jensen–Shannon divergence of the two load distributions in bits ∈ [0, 1] (0 = identical).

Datasets (:func:`load_samples`, shared with :mod:`moelab.analysis.activation`) are token directories
(``moelab data prepare``), SFT JSON Lines files (prompt/completion or messages; packed rows, or k-shot
prompts) or any text source of :mod:`moelab.data.sources` (``shakespeare``, a directory, a glob, a file).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.errors import ConfigError, DataError

DEFAULT_COVERAGE = 0.5


# ----------------------------------------------------------------------------------------------
# datasets -> token sequences
# ----------------------------------------------------------------------------------------------
def data_kind(spec: str | os.PathLike) -> str:
    """``tokens`` (a token directory), ``sft`` (JSON Lines with ``prompt``/``messages``) or ``text``."""
    p = Path(spec)
    if p.is_dir() and (p / "meta.json").is_file():
        return "tokens"
    if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        try:
            with open(p, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "")
            obj = json.loads(first) if first else None
        except (OSError, ValueError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict) and ("messages" in obj or "prompt" in obj):
            return "sft"
    return "text"


def check_data(spec: str | os.PathLike, split: str = "val", text_field: str = "text") -> None:
    """Raise a :class:`DataError` unless ``spec`` names data :func:`load_samples` can read (cheap: no
    tokenising), so that a command fails before it loads a model."""
    kind = data_kind(spec)
    if kind == "tokens":
        from moelab.data.tokens import read_meta

        meta_splits = read_meta(spec).get("splits", {})
        if split not in meta_splits:
            raise DataError(f"{spec} has no {split!r} split (it has {', '.join(meta_splits) or 'none'}); "
                            "pass --split train (or another split)")
    elif kind == "text":
        from moelab.data.sources import Source

        Source(spec, text_field)


def dataset_name(spec: str | os.PathLike) -> str:
    """A short label for a dataset spec: the file stem or directory name (``shakespeare`` stays)."""
    p = Path(str(spec).rstrip("/"))
    return p.stem if p.suffix else (p.name or str(spec))


def unique_names(specs: Sequence[str]) -> list[str]:
    """:func:`dataset_name` of each spec, with ``#2``, ``#3``... appended to repeated names."""
    out: list[str] = []
    for s in specs:
        name, k = dataset_name(s), 2
        while name in out:
            name, k = f"{dataset_name(s)}#{k}", k + 1
        out.append(name)
    return out


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the argument itself)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


def _encode(tokenizer, text: str) -> list[int]:
    be = _backend(tokenizer)
    if be is not None:
        return be.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Renderer:
    """Chat messages -> token ids with whatever the tokenizer offers.

    The DeepSeek template of :class:`moelab.data.sft.ChatFormat` when the tokenizer reserves the DeepSeek
    special tokens (every moelab tokenizer does), else the tokenizer's own chat template (SmolLM2 and other
    transformers chat models), else plain ``User: ...\\n\\nAssistant: ...`` text.
    """

    def __init__(self, tokenizer):
        from moelab.data.sft import ChatFormat
        from moelab.data.tokenizer import ASSISTANT, BOS, EOS, USER

        self.tok, self.fmt = tokenizer, None
        be = _backend(tokenizer)
        if be is not None and all(be.token_to_id(t) is not None for t in (BOS, EOS, USER, ASSISTANT)):
            self.fmt = ChatFormat(be, "deepseek")
            self.pad = self.fmt.pad
            return
        self.template = bool(getattr(tokenizer, "chat_template", None))
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
        self.pad = 0 if pad is None else int(pad)

    def _plain(self, messages: list[dict], prompt: bool) -> str:
        parts = []
        for m in messages:
            if m["role"] == "system":
                parts.append(m["content"] + "\n\n")
            elif m["role"] == "user":
                parts.append(f"User: {m['content']}\n\nAssistant: ")
            else:
                parts.append(m["content"] + "\n\n")
        return "".join(parts) if prompt else "".join(parts).rstrip("\n")

    def full(self, messages: list[dict]) -> list[int]:
        """The whole conversation (every assistant turn included)."""
        if self.fmt is not None:
            return self.fmt.render(messages).ids
        if self.template:
            return _encode(self.tok, self.tok.apply_chat_template(messages, tokenize=False))
        return _encode(self.tok, self._plain(messages, False))

    def prompt(self, messages: list[dict]) -> list[int]:
        """The conversation up to where the next assistant turn would start."""
        if self.fmt is not None:
            return self.fmt.prompt_ids(messages)
        if self.template:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return _encode(self.tok, text)
        return _encode(self.tok, self._plain(messages, True))


def load_samples(spec: str | os.PathLike, tokenizer, n: int, seq_len: int, *, seed: int = 0,
                 split: str = "val", shots: int | None = None, text_field: str = "text",
                 vocab_size: int | None = None) -> list[torch.Tensor]:
    """Up to ``n`` token sequences (int64 ``[T_i]``, ``T_i <= seq_len``) from a dataset spec.

    * token directory: ``n`` windows of ``seq_len`` tokens at seeded random offsets of ``split``;
    * SFT JSON Lines: with ``shots = None``, rows of whole examples packed up to ``seq_len`` tokens (trailing
      padding removed; at most as many rows as the file fills); with ``shots = k``, ``n`` k-shot prompts —
      k solved examples then one more question, ending where the answer would start (cut on the left
      to ``seq_len``), so the next token is an answer token (the 3-shot prompts of docs/methods.md §7);
    * anything else is a text source (:class:`moelab.data.sources.Source`): documents drawn in a seeded
      order, each tokenised and cut to a window of ``seq_len`` tokens at a random offset (a shorter
      document is taken whole; fewer than 8 tokens are skipped); with fewer documents than ``n``, each gives
      several non-overlapping windows.

    ``tokenizer`` is the model's (a transformers tokenizer or a ``tokenizers.Tokenizer``); ``vocab_size``,
    when given, checks that every id fits the model.
    """
    if n < 1 or seq_len < 2:
        raise DataError(f"need n >= 1 samples of seq_len >= 2 tokens (got n={n}, seq_len={seq_len})")
    kind = data_kind(spec)
    rng = np.random.default_rng(seed)
    if kind == "tokens":
        from moelab.data.tokens import TokenData, read_meta

        meta_splits = read_meta(spec).get("splits", {})
        if split not in meta_splits:
            raise DataError(f"{spec} has no {split!r} split (it has {', '.join(meta_splits) or 'none'}); "
                            "pass --split train (or another split)")
        x, _ = TokenData(spec, split).batch(n, seq_len, step=0, seed=seed)
        out = list(x)
    elif kind == "sft":
        out = _sft_samples(spec, tokenizer, n, seq_len, rng, seed, shots)
    else:
        out = _text_samples(spec, tokenizer, n, seq_len, rng, text_field)
    if not out:
        raise DataError(f"{spec} gave no token sequences; give a larger dataset or a shorter --seq-len")
    if vocab_size is not None:
        hi = max(int(s.max()) for s in out)
        if hi >= vocab_size:
            raise DataError(f"{spec} holds token id {hi}, outside the model's vocabulary (0..{vocab_size - 1}); "
                            "was it tokenised with this model's tokenizer? Prepare it again with "
                            "`moelab data prepare ... --tokenizer MODEL_DIR`")
    return out


def _sft_samples(spec, tokenizer, n, seq_len, rng, seed, shots) -> list[torch.Tensor]:
    from moelab.data.sft import Example, pack, read_jsonl

    convs = [m for _, m in read_jsonl(spec, skip_hint=None)]     # the analyze commands cannot skip lines
    if not convs:
        raise DataError(f"{spec} holds no examples")
    r = _Renderer(tokenizer)
    if shots is None:
        examples = [Example(ids, list(ids), 0) for ids in (r.full(m) for m in convs)]
        ids, _ = pack(examples, seq_len, r.pad, seed=seed)
        rows = []
        for row in ids[:n, :-1]:
            keep = len(row)
            while keep > 1 and row[keep - 1] == r.pad:
                keep -= 1
            rows.append(torch.from_numpy(row[:keep].copy()))
        return rows
    if shots < 0:
        raise DataError(f"shots must be >= 0 (got {shots})")
    if len(convs) < shots + 1:
        raise DataError(f"{spec} has {len(convs)} examples, fewer than shots + 1 = {shots + 1}; use fewer shots")
    out = []
    for _ in range(n):
        pick = rng.choice(len(convs), size=shots + 1, replace=False)
        msgs = [m for i in pick[:-1] for m in convs[int(i)]]
        query = list(convs[int(pick[-1])])
        while query and query[-1]["role"] == "assistant":     # ask, do not answer
            query.pop()
        ids = r.prompt([m for m in msgs if m["role"] != "system"] + query)[-seq_len:]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def _text_samples(spec, tokenizer, n, seq_len, rng, text_field, max_docs: int = 100_000) -> list[torch.Tensor]:
    from moelab.data.sources import Source

    docs = []
    for d in Source(spec, text_field).documents():
        docs.append(d.text)
        if len(docs) >= max_docs:
            break
    out: list[torch.Tensor] = []
    per_doc = -(-n // max(len(docs), 1))            # a few long documents give several windows each
    for i in rng.permutation(len(docs)):
        ids = _encode(tokenizer, docs[int(i)])
        if len(ids) < 8:
            continue
        if len(ids) <= seq_len:
            out.append(torch.tensor(ids, dtype=torch.long))
        else:                                        # non-overlapping windows at a random shift
            chunks = len(ids) // seq_len
            shift = int(rng.integers(0, len(ids) - chunks * seq_len + 1))
            for c in sorted(rng.choice(chunks, size=min(per_doc, chunks, n - len(out)), replace=False)):
                start = shift + int(c) * seq_len
                out.append(torch.tensor(ids[start:start + seq_len], dtype=torch.long))
        if len(out) >= n:
            break
    return out[:n]


def batched(samples: Sequence[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    """Consecutive samples of equal length stacked into ``[B, T]`` batches of at most ``batch_size``."""
    run: list[torch.Tensor] = []
    for s in samples:
        if run and (len(s) != len(run[0]) or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(s)
    if run:
        yield torch.stack(run)


class progress_bar:
    """``with progress_bar(items, enabled, "what") as it: for x in it: ...`` — a rich bar on stderr."""

    def __init__(self, items, enabled: bool, what: str, total: int | None = None):
        self.items, self.enabled, self.what, self.total, self.bar = items, enabled, what, total, None

    def __enter__(self):
        if not self.enabled:
            return iter(self.items)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = self.total if self.total is not None else (len(self.items) if hasattr(self.items, "__len__")
                                                           else None)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        return self.bar.track(self.items, total=total, description=self.what)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------------------------
# collecting routing decisions
# ----------------------------------------------------------------------------------------------
def routed_layers(model) -> dict:
    """Decoder-layer index -> :class:`moelab.model.moe.DeepSeekMoE` block; a ConfigError if there are none."""
    from moelab.model.moe import DeepSeekMoE
    from moelab.model.transformer import DeepSeekForCausalLM

    if not isinstance(model, DeepSeekForCausalLM):
        raise ConfigError(f"routing analysis needs routed experts, and {type(model).__name__} is not a moelab "
                          "mixture-of-experts model; give a moelab / DeepSeek checkpoint directory (it loads "
                          "with moelab's MoE layers, whose routing decisions can be observed)")
    layers = {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, DeepSeekMoE)}
    if not layers:
        cfg = model.config
        raise ConfigError(f"routing analysis needs routed experts; this model (n_routed_experts="
                          f"{cfg.n_routed_experts}, {cfg.num_hidden_layers} layers, first_k_dense_replace="
                          f"{cfg.first_k_dense_replace}) has only dense layers. Give a mixture-of-experts "
                          "checkpoint (n_routed_experts > 0)")
    return layers


@dataclass
class RoutingStats:
    """What one dataset's tokens did in every MoE layer.

    Attributes:
        name: dataset label; layers: decoder-layer indices of the MoE layers (L of them);
        counts: int64 ``[L, E]`` (token, expert) assignments; gate: float64 ``[L, E]`` summed gate weights;
        tokens: N tokens seen; sequences: how many sequences; top_k: K.
    """

    name: str
    layers: list[int]
    counts: np.ndarray
    gate: np.ndarray
    tokens: int
    sequences: int
    top_k: int

    @property
    def load(self) -> np.ndarray:
        """``[L, E]`` share of each layer's N·K routing slots (rows sum to 1)."""
        return self.counts / np.maximum(self.counts.sum(1, keepdims=True), 1)

    @property
    def gate_share(self) -> np.ndarray:
        """``[L, E]`` share of each layer's gate mass (rows sum to 1)."""
        return self.gate / np.maximum(self.gate.sum(1, keepdims=True), 1e-300)


@torch.no_grad()
def collect_routing(model, samples: Sequence[torch.Tensor], name: str = "data", batch_size: int = 8,
                    progress: bool = False) -> RoutingStats:
    """Run ``samples`` (int64 ``[T_i]`` sequences, no padding) through ``model`` and count routing decisions.

    Uses the MoE blocks' ``routing_observers``; the model runs in eval mode (its mode is restored) and
    only the backbone runs (no logits).
    """
    layers = routed_layers(model)
    E, K = model.config.n_routed_experts, model.config.num_experts_per_tok
    device = next(model.parameters()).device
    counts = {i: torch.zeros(E, dtype=torch.int64, device=device) for i in layers}
    gate = {i: torch.zeros(E, dtype=torch.float64, device=device) for i in layers}

    def observe(moe, routing) -> None:
        idx = routing.indices.reshape(-1)                                   # [N·K]
        counts[moe.layer_idx] += torch.bincount(idx, minlength=E)
        gate[moe.layer_idx] += torch.bincount(idx, weights=routing.weights.reshape(-1).double(), minlength=E)

    n_tok = n_seq = 0
    was_training = model.training
    for moe in layers.values():
        moe.routing_observers.append(observe)
    try:
        model.eval()
        batches = list(batched(samples, batch_size))
        with progress_bar(batches, progress, f"routing {name}") as items:
            for ids in items:
                model.model(ids.to(device))
                n_tok += ids.numel()
                n_seq += ids.shape[0]
    finally:
        for moe in layers.values():
            moe.routing_observers[:] = [fn for fn in moe.routing_observers if fn is not observe]
        model.train(was_training)
    if n_tok == 0:
        raise DataError(f"{name}: no tokens to route; give at least one sequence")
    order = sorted(layers)
    return RoutingStats(name, order, torch.stack([counts[i] for i in order]).cpu().numpy(),
                        torch.stack([gate[i] for i in order]).cpu().numpy(), n_tok, n_seq, K)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def cover_set(load: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> list[int]:
    """Smallest set of experts (``load`` ``[E]``) whose shares reach ``coverage``, in selection order."""
    if not 0 < coverage <= 1:
        raise ConfigError(f"coverage must be in (0, 1] (got {coverage})")
    order = np.argsort(-np.asarray(load, dtype=np.float64), kind="stable")
    chosen, total = [], 0.0
    for e in order:
        chosen.append(int(e))
        total += float(load[e])
        if total >= coverage - 1e-12:
            break
    return chosen


def normalized_entropy(p: np.ndarray) -> float:
    """H(p) / ln(len(p)) for a distribution ``p`` ``[E]`` (0·ln 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(len(p))) if len(p) > 1 else 0.0


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (∈ [0, 1]) of two distributions ``[E]``."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def layer_metrics(load: np.ndarray, top_k: int, coverage: float = DEFAULT_COVERAGE,
                  top_n: Sequence[int] | None = None) -> dict:
    """The per-layer numbers of the module docstring for one load vector ``[E]``."""
    load = np.asarray(load, dtype=np.float64)
    E = len(load)
    ns = sorted({n for n in (top_n or (1, top_k, 2 * top_k)) if 1 <= n <= E})
    desc = np.sort(load)[::-1]
    cs = cover_set(load, coverage)
    return {"entropy": normalized_entropy(load), "top_n": {str(n): float(desc[:n].sum()) for n in ns},
            "cover_set": cs, "cover_size": len(cs), "max_vio": float(load.max() * E - 1)}


def overlap(load_a: np.ndarray, load_b: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> dict:
    """``{"jaccard", "cosine", "js"}`` between two load vectors ``[E]`` (see the module docstring)."""
    a, b = set(cover_set(load_a, coverage)), set(cover_set(load_b, coverage))
    na, nb = float(np.linalg.norm(load_a)), float(np.linalg.norm(load_b))
    cos = float(np.dot(load_a, load_b) / (na * nb)) if na > 0 and nb > 0 else float("nan")
    return {"jaccard": len(a & b) / len(a | b), "cosine": cos, "js": js_divergence(load_a, load_b)}


def routing_report(stats: Sequence[RoutingStats], coverage: float = DEFAULT_COVERAGE,
                   top_n: Sequence[int] | None = None) -> dict:
    """Everything :func:`collect_routing` measured, as a JSON-ready dict.

    ``{"coverage", "top_k", "n_routed_experts", "layers", "datasets": {name: {"tokens", "sequences",
    "layers": {layer: {"load", "gate_share", "entropy", "top_n", "cover_set", "cover_size", "max_vio"}},
    "mean": {...}}}, "overlap": {"a|b": {"layers": {layer: {"jaccard", "cosine", "js"}}, "mean": {...}}},
    "overlap_matrix": {metric: [[D×D means over layers]]}, "names": [...]}``.
    """
    if not stats:
        raise ConfigError("routing_report needs at least one dataset")
    layers, K, E = stats[0].layers, stats[0].top_k, stats[0].counts.shape[1]
    if any(s.layers != layers or s.counts.shape[1] != E for s in stats):
        raise ConfigError("routing statistics of different models cannot be compared; collect them all with "
                          "the same model")
    out: dict = {"coverage": coverage, "top_k": K, "n_routed_experts": E, "layers": layers,
                 "names": [s.name for s in stats], "datasets": {}, "overlap": {}}
    for s in stats:
        per = {}
        for li, layer in enumerate(layers):
            m = layer_metrics(s.load[li], K, coverage, top_n)
            per[str(layer)] = {"load": s.load[li].tolist(), "gate_share": s.gate_share[li].tolist(), **m}
        mean = {"entropy": _mean(p["entropy"] for p in per.values()),
                "cover_size": _mean(p["cover_size"] for p in per.values()),
                "max_vio": _mean(p["max_vio"] for p in per.values()),
                "top_n": {n: _mean(p["top_n"][n] for p in per.values()) for n in next(iter(per.values()))["top_n"]}}
        out["datasets"][s.name] = {"tokens": s.tokens, "sequences": s.sequences, "layers": per, "mean": mean}
    metrics = ("jaccard", "cosine", "js")
    D = len(stats)
    matrix = {m: [[float("nan")] * D for _ in range(D)] for m in metrics}
    for i in range(D):
        for j in range(D):
            per = {str(layer): overlap(stats[i].load[li], stats[j].load[li], coverage)
                   for li, layer in enumerate(layers)}
            mean = {m: _mean(p[m] for p in per.values()) for m in metrics}
            for m in metrics:
                matrix[m][i][j] = mean[m]
            if i < j:
                out["overlap"][f"{stats[i].name}|{stats[j].name}"] = {"layers": per, "mean": mean}
    out["overlap_matrix"] = matrix
    return out


def _mean(values: Iterable[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(sum(v) / len(v)) if v else float("nan")


# ----------------------------------------------------------------------------------------------
# files and plots
# ----------------------------------------------------------------------------------------------
def _finite(obj):
    """JSON-safe copy: NaN / ±inf become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON (non-finite numbers as null), atomically."""
    from moelab.analysis.isoflop import write_atomic

    write_atomic(Path(path), json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render a matplotlib ``Figure`` to PNG at ``path`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from moelab.analysis.isoflop import write_atomic

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(Path(path), buf.getvalue())
    return Path(path)


def plot_routing_load(stats: Sequence[RoutingStats], path: str | os.PathLike) -> Path:
    """One layer × expert heatmap of ``load`` per dataset (shared colour scale, 1/E marked on the bar);
    with exactly two datasets a third panel shows their difference."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    D = len(stats)
    L, E = stats[0].counts.shape
    panels = D + (D == 2)
    fig = Figure(figsize=(max(4.0, 0.28 * E + 1.8) * panels, 0.45 * L + 1.8), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    vmax = max(float(s.load.max()) for s in stats)
    for ax, s in zip(axes, stats, strict=False):
        im = ax.imshow(s.load, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        _axes(ax, s.layers, E, f"{s.name}\n({s.tokens:,} tokens)")
    cb = fig.colorbar(im, ax=axes[:D].tolist(), shrink=0.9, label="share of routed slots")
    cb.ax.axhline(1 / E, color="w", lw=1.5)
    if D == 2:
        diff = stats[0].load - stats[1].load
        lim = max(float(np.abs(diff).max()), 1e-9)
        im = axes[2].imshow(diff, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0, -lim, lim),
                            interpolation="nearest")
        _axes(axes[2], stats[0].layers, E, f"{stats[0].name} − {stats[1].name}")
        fig.colorbar(im, ax=axes[2], shrink=0.9, label="load difference")
    fig.suptitle("Routed-expert load per MoE layer")
    return save_figure(fig, path)


def _axes(ax, layers, E, title):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    step = max(1, E // 16)
    ax.set_xticks(range(0, E, step))


def plot_routing_overlap(report: dict, path: str | os.PathLike) -> Path:
    """Dataset × dataset matrices of the layer-averaged Jaccard, cosine and JS overlap (top), and each pair's
    per-layer curves (bottom)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names, layers = report["names"], report["layers"]
    D = len(names)
    fig = Figure(figsize=(13, 3.2 + 0.35 * D + 3.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    axes = top.subplots(1, 3)
    titles = {"jaccard": f"Jaccard of {report['coverage']:.0%}-cover sets", "cosine": "cosine of loads",
              "js": "JS divergence (bits)"}
    for ax, (m, title) in zip(axes, titles.items(), strict=True):
        mat = np.array(report["overlap_matrix"][m], dtype=float)
        im = ax.imshow(mat, cmap="magma_r" if m == "js" else "magma", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(D), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(D), names, fontsize=8)
        for i in range(D):
            for j in range(D):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="w" if (mat[i, j] < 0.5) != (m == "js") else "k")
        top.colorbar(im, ax=ax, shrink=0.8)
    axes = bottom.subplots(1, 3, sharex=True)
    for ax, m in zip(axes, titles, strict=True):
        for k, (pair, o) in enumerate(report["overlap"].items()):
            ax.plot(layers, [o["layers"][str(layer)][m] for layer in layers], "o-", color=f"C{k % 10}",
                    label=pair.replace("|", " vs "))
        ax.set_xlabel("layer")
        ax.set_ylabel(m)
        ax.set_ylim(0, 1.02 if m != "js" else max(0.1, 1.2 * max(
            (v[m] for o in report["overlap"].values() for v in o["layers"].values()), default=0.1)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if report["overlap"]:
        axes[0].legend(fontsize=8)
    fig.suptitle("Expert overlap between datasets (per MoE layer below)")
    return save_figure(fig, path)


__all__ = ["DEFAULT_COVERAGE", "RoutingStats", "batched", "collect_routing", "cover_set", "data_kind",
           "dataset_name", "js_divergence", "layer_metrics", "load_samples", "normalized_entropy", "overlap",
           "plot_routing_load", "plot_routing_overlap", "progress_bar", "routed_layers", "routing_report",
           "save_figure", "unique_names", "write_json"]
