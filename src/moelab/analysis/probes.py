"""Linear number probes (docs/methods.md §8; Zhu et al., arXiv 2401.03735): do a model's hidden states hold
the values of the numbers in an addition prompt, linearly, layer by layer — and does pushing a hidden
state along a probe's direction change the model's answer?

    model, tok = load_causal_lm("smollm2")
    res = run_probes(model, tok, ProbeSettings(n_per_length=200))
    write_results(res, Path("runs/probes"))        # results.json, probes.png, problems.jsonl

Legend: N problems, S = L + 1 residual states, H hidden size, B batch, T tokens.

**Residual states.** State 0 is the embedding output, state l (1 ≤ l ≤ L) the output of decoder block
l − 1, before the final norm (so the last state is *not* transformers' normed ``hidden_states[-1]``).
They are read with forward hooks on ``model.model.embed_tokens`` and ``model.model.layers[i]``, which
LLaMA-family transformers models and moelab's DeepSeek models share; probes and steering use the same
index, so "steer at layer l" adds to the state that probe l reads.

**Targets.** ``a`` at a's last digit, ``b`` at b's last digit, ``o`` (the model's own greedy answer,
parsed from at most ``max_new_tokens`` generated tokens) and ``sum`` (a + b) at the last prompt token.
Each probe predicts log2(value).

**Probes.** Per state and target: ridge regression in closed form with an unpenalised intercept,
``w = (XcᵀXc + λI)⁻¹ Xcᵀyc`` on centred train data (λ = 0.1, sklearn's ``Ridge(alpha=0.1)``); an MLP
probe (H → 256 → 1, ReLU, Adam, best epoch on val) as a non-linear baseline; and a shuffled-label
control (ridge on permuted train labels), whose test R² should be ≈ 0. Test-split metrics: Pearson ρ,
R², MSE in log2 units, AAcc = share of |2^pred − x| < 0.01·x, and R² within one operand length
(``r2_within``): operands of d digits give prompts of a fixed length, so the digit count alone — which
position and token count betray — already explains ~99% of the variance of log2(value); ``r2_within``
says how much of the rest a probe gets.

**Steering.** At the states in ``steer_layers`` (default: the paper's blocks 14–19 of 32, scaled to the
model's depth) add ``α·u`` to the last position of every forward pass — the last prompt token, then each
generated token, as NumProbe's hooks do under a KV cache — with u = W/‖W‖ of that state's ``o`` probe,
a random Gaussian unit vector (fixed per state), or h/‖h‖ (the null direction). A steered run succeeds
when its answer o′ parses, o′ < 10^(d+1), and o′ > o, the unsteered answer; the problems are fresh
``steer_digits``-digit additions (4, as in the paper) whose unsteered answer parses.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from moelab.analysis.probes_data import (
    DIGIT_LENGTHS,
    MAX_DIGITS,
    PROMPT_TEMPLATES,
    PromptTokens,
    find_positions,
    make_problems,
    parse_answer,
    render_prompt,
)
from moelab.errors import ConfigError, MoelabError
from moelab.lm.logits import is_moelab, model_device
from moelab.lm.padding import left_pad

TARGETS = ("a", "b", "o", "sum")
#: which hidden-state position each target is read at
TARGET_POSITION = {"a": "a", "b": "b", "o": "last", "sum": "last"}
#: NumProbe steers blocks 14..19 of Llama-2-7B's 32; scaled to other depths (see default_steer_layers)
PAPER_STEER_BLOCKS, PAPER_DEPTH = (14, 19), 32


class ProbeError(MoelabError):
    """A probe run cannot go on (a model without the expected layers, too few usable answers, ...)."""


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------
@dataclass
class ProbeSettings:
    """Everything that defines a probe run (recorded in results.json).

    ``n_per_length`` problems per operand length (the paper: 1000, i.e. 9,000 in all); ``steer_layers``
    None → :func:`default_steer_layers`; ``steer_n`` steering problems of ``steer_digits`` digits
    (0 → no steering), each steered once per strength in ``steer_alphas`` (the paper: 2); ``mlp_epochs``
    0 → no MLP probe.
    """

    n_per_length: int = 1000
    lengths: tuple[int, ...] = DIGIT_LENGTHS
    seed: int = 0
    prompt_variant: str = "code"
    ridge_lambda: float = 0.1
    mlp_hidden: int = 256
    mlp_epochs: int = 10
    max_new_tokens: int = 30
    batch_size: int = 32
    steer_layers: tuple[int, ...] | None = None
    steer_alphas: tuple[float, ...] = (2.0,)
    steer_n: int = 200
    steer_digits: int = 4

    def validate(self) -> None:
        if not self.lengths:
            raise ConfigError("give at least one operand length (e.g. 2-10, the paper's)")
        bad = [d for d in self.lengths if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIGITS]
        if bad:
            raise ConfigError(f"operand lengths must be from 1 to {MAX_DIGITS} digits (got {bad[0]!r}); the paper "
                              "uses 2-10")
        if self.prompt_variant not in PROMPT_TEMPLATES:
            raise ConfigError(f"unknown prompt variant {self.prompt_variant!r}; choose one of "
                              f"{', '.join(PROMPT_TEMPLATES)}")
        if not (self.ridge_lambda > 0 and math.isfinite(self.ridge_lambda)):
            raise ConfigError(f"the ridge penalty must be a positive number (got {self.ridge_lambda}); the paper "
                              "uses 0.1")
        for name in ("mlp_hidden", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.mlp_epochs < 0 or self.steer_n < 0:
            raise ConfigError("mlp-epochs and steer-n must be >= 0 (0 turns that part off)")
        if self.steer_n and not 1 <= self.steer_digits <= MAX_DIGITS:
            raise ConfigError(f"steer-digits must be between 1 and {MAX_DIGITS} (got {self.steer_digits}); the paper "
                              "uses 4")
        if self.steer_n and (not self.steer_alphas or not all(math.isfinite(a) for a in self.steer_alphas)):
            raise ConfigError(f"steer-alpha needs one or more finite numbers (got {self.steer_alphas}); the paper "
                              "uses 2")


def default_steer_layers(n_layers: int) -> tuple[int, ...]:
    """The paper's steered blocks 14–19 of 32, scaled to ``n_layers`` blocks, as residual states.

    Block i's output is state i + 1, so for 32 blocks this is (15, ..., 20); for 30 blocks (14, ..., 19).
    """
    width = PAPER_STEER_BLOCKS[1] - PAPER_STEER_BLOCKS[0] + 1
    first = round(PAPER_STEER_BLOCKS[0] * n_layers / PAPER_DEPTH) + 1
    first = max(1, min(first, n_layers - min(width, n_layers) + 1))
    return tuple(range(first, min(first + width, n_layers + 1)))


# --------------------------------------------------------------------------------------------------
# model access: residual states and steering hooks
# --------------------------------------------------------------------------------------------------
def residual_modules(model: nn.Module) -> list[nn.Module]:
    """``[embed_tokens, layers[0], ..., layers[L-1]]``: the modules whose outputs are states 0..L."""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(embed, nn.Module) or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ProbeError(f"number probes read hidden states from model.model.embed_tokens and model.model.layers "
                         f"(LLaMA, Mistral, Qwen, DeepSeek and moelab models have them); {type(model).__name__} "
                         "does not")
    return [embed, *layers]


def _tensor_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _with_tensor(out, h: torch.Tensor):
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextmanager
def capture_states(model: nn.Module):
    """Record every residual state of each forward pass: yields a list that fills with S tensors [B, T, H]."""
    mods = residual_modules(model)
    states: list[torch.Tensor | None] = [None] * len(mods)

    def make(i):
        def hook(_mod, _inp, out):
            states[i] = _tensor_of(out).detach()
        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(mods)]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@contextmanager
def steering(model: nn.Module, directions: dict[int, torch.Tensor | None], alpha: float):
    """Add ``alpha·u`` to residual state l at the last position of every forward pass while active.

    ``directions`` maps a state index l (0..L) to a vector [H] (u = v/‖v‖) or to None for the null
    direction (u = h/‖h‖, the state itself). Other positions and other states are left alone; later
    states change only through the model's own computation.
    """
    mods = residual_modules(model)
    for layer in directions:
        if not 0 <= layer < len(mods):
            raise ConfigError(f"cannot steer residual state {layer}: this model has states 0..{len(mods) - 1}")

    def make(v):
        unit = None if v is None else (v / v.norm()).detach()

        def hook(_mod, _inp, out):
            h = _tensor_of(out).clone()
            last = h[:, -1]
            u = last / last.norm(dim=-1, keepdim=True) if unit is None else unit.to(h)
            h[:, -1] = last + alpha * u
            return _with_tensor(out, h)
        return hook

    # prepend: the shifted state is the layer's output for every other hook too (e.g. capture_states)
    handles = [mods[layer].register_forward_hook(make(v), prepend=True) for layer, v in directions.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _bar(progress: bool, console: Console | None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console or Console(stderr=True), transient=True, disable=not progress)


@torch.inference_mode()
def collect_states(model: nn.Module, tokens: PromptTokens, batch_size: int = 32, progress: bool = False,
                   console: Console | None = None) -> dict[str, np.ndarray]:
    """Residual states at each prompt's three positions: ``{"a", "b", "last"}`` → float32 ``[S, N, H]``.

    Prompts are right-padded, so no attention mask is needed: a causal model's real tokens never see the
    padding after them.
    """
    model.eval()
    n = len(tokens.input_ids)
    pos = {"a": tokens.pos_a, "b": tokens.pos_b, "last": tokens.pos_last}
    out: dict[str, np.ndarray] = {}
    dev = model_device(model)
    with capture_states(model) as states, _bar(progress, console) as bar:
        task = bar.add_task("hidden states", total=n)
        for s in range(0, n, batch_size):
            chunk = tokens.input_ids[s:s + batch_size]
            T = max(len(c) for c in chunk)
            ids_BT = torch.zeros(len(chunk), T, dtype=torch.long)
            for i, c in enumerate(chunk):
                ids_BT[i, :len(c)] = torch.tensor(c)
            model.model(ids_BT.to(dev))                      # the LM head is not needed
            rows = torch.arange(len(chunk))
            for key, p in pos.items():
                idx = torch.tensor(p[s:s + len(chunk)])
                picked_SBH = torch.stack([st[rows, idx.to(st.device)].float().cpu() for st in states])
                if key not in out:
                    out[key] = np.empty((picked_SBH.shape[0], n, picked_SBH.shape[2]), dtype=np.float32)
                out[key][:, s:s + len(chunk)] = picked_SBH.numpy()
            bar.advance(task, len(chunk))
    return out


# --------------------------------------------------------------------------------------------------
# greedy answers
# --------------------------------------------------------------------------------------------------
def _first_line_done(tokenizer, prompt_len: int):
    """A transformers stopping criterion: a row is done once its first non-empty generated line has ended."""
    from transformers import StoppingCriteria

    class FirstLine(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)

    return FirstLine()


@torch.inference_mode()
def generate_answers(model: nn.Module, tokenizer, input_ids: list[list[int]], max_new_tokens: int = 30,
                     batch_size: int = 32, progress: bool = False, console: Console | None = None,
                     desc: str = "answers") -> list[tuple[str, int | None]]:
    """Greedy continuations of the prompts and the answer parsed from each: N × ``(text, o or None)``.

    Left-padded batches; a row stops at EOS, at the end of its first non-empty line (transformers models)
    or after ``max_new_tokens``. A number cut off by the token limit gives None.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    dev = model_device(model)
    results: list[tuple[str, int | None]] = []
    with _bar(progress, console) as bar:
        task = bar.add_task(desc, total=len(input_ids))
        for s in range(0, len(input_ids), batch_size):
            ids, mask = left_pad(input_ids[s:s + batch_size], pad)
            ids, mask = ids.to(dev), mask.to(dev)
            T = ids.shape[1]
            if is_moelab(model):
                from moelab.infer.generate import generate

                seq = generate(model, ids, max_new_tokens, eos_token_id=eos, attention_mask=mask)
            else:
                from transformers import GenerationConfig, StoppingCriteriaList

                cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                       eos_token_id=eos)
                seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                     stopping_criteria=StoppingCriteriaList([_first_line_done(tokenizer, T)]))
            for row in seq[:, T:].tolist():
                done = eos is not None and eos in row
                if done:
                    row = row[:row.index(eos)]
                text = tokenizer.decode(row, skip_special_tokens=True)
                results.append((text, parse_answer(text, complete=done)))
            bar.advance(task, ids.shape[0])
    return results


# --------------------------------------------------------------------------------------------------
# probes and metrics
# --------------------------------------------------------------------------------------------------
@dataclass
class RidgeProbe:
    """``pred = X @ w + b``; ``w`` [H] float64, ``b`` scalar."""

    w: np.ndarray
    b: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        """``X`` [N, H] → [N]."""
        return np.asarray(X, dtype=np.float64) @ self.w + self.b


def fit_ridge(X: np.ndarray, y: np.ndarray, lam: float = 0.1) -> RidgeProbe | list[RidgeProbe]:
    """Ridge regression ``min ‖Xw + b − y‖² + λ‖w‖²`` (b unpenalised) in closed form.

    ``X`` [N, H]; ``y`` [N] → one probe, or [N, K] → K probes sharing one solve with
    ``XcᵀXc + λI`` (Xc, yc: X and y minus their means). Solved in float64 with torch's LAPACK.
    """
    X_NH = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    y_NK = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    single = y_NK.dim() == 1
    if single:
        y_NK = y_NK[:, None]
    x_mean, y_mean = X_NH.mean(0), y_NK.mean(0)
    Xc = X_NH - x_mean
    gram_HH = Xc.T @ Xc
    gram_HH.diagonal().add_(lam)
    w_HK = torch.linalg.solve(gram_HH, Xc.T @ (y_NK - y_mean))
    b_K = y_mean - x_mean @ w_HK
    probes = [RidgeProbe(w_HK[:, k].numpy().copy(), float(b_K[k])) for k in range(w_HK.shape[1])]
    return probes[0] if single else probes


def _group_means(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each entry of ``y`` [N] replaced by the mean of its group (``groups`` [N])."""
    _, inv = np.unique(groups, return_inverse=True)
    return (np.bincount(inv, weights=y) / np.bincount(inv))[inv]


def probe_metrics(pred_log2: np.ndarray, values: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """Metrics of log2 predictions against true positive values (both [N]).

    ``rho`` Pearson correlation of prediction and log2(value); ``r2`` 1 − SS_res/SS_tot in log2 units;
    ``mse`` mean squared log2 error; ``aacc`` share with |2^pred − value| < 0.01·value. ``rho`` and ``r2``
    are None when the targets (or predictions) are constant.

    With ``groups`` [N] (the operand length of each problem) also ``r2_within`` = 1 − SS_res / Σ(y − ȳ_g)²,
    R² against the per-group means: the share of the variation *within* one operand length the probe
    explains. Plain R² is inflated by the digit count, which alone (and the prompt length with it)
    pins log2(value) down to about ±1.7.
    """
    p = np.asarray(pred_log2, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    y = np.log2(x)
    res = float(((y - p) ** 2).sum())
    tot = float(((y - y.mean()) ** 2).sum())
    rho = None
    if len(y) > 1 and p.std() > 0 and y.std() > 0:
        rho = float(np.corrcoef(p, y)[0, 1])
    with np.errstate(over="ignore"):
        aacc = float(np.mean(np.abs(np.exp2(p) - x) < 0.01 * x)) if len(x) else None
    out = {"rho": rho, "r2": 1.0 - res / tot if tot > 0 else None, "mse": res / len(y) if len(y) else None,
           "aacc": aacc, "n": int(len(y))}
    if groups is not None:
        within = float(((y - _group_means(y, np.asarray(groups))) ** 2).sum())
        out["r2_within"] = 1.0 - res / within if within > 0 else None
    return out


def length_baseline_r2(values: np.ndarray, groups: np.ndarray) -> float | None:
    """R² of predicting log2(value) by the mean of its group (operand length) alone — what a probe that
    only knows the digit count would reach. ``values``, ``groups`` [N]."""
    y = np.log2(np.asarray(values, dtype=np.float64))
    tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - _group_means(y, np.asarray(groups))) ** 2).sum()) / tot if tot > 0 else None


def fit_mlp_probe(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                  hidden: int = 256, epochs: int = 10, seed: int = 0, lr: float = 1e-3,
                  batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """An MLP probe H → hidden → 1 (ReLU) on standardised inputs/targets; returns ``predict(X [N, H]) → [N]``.

    Adam for ``epochs`` passes over the train set; the weights of the epoch with the lowest val MSE are kept.
    """
    Xt = torch.as_tensor(np.asarray(X_train), dtype=torch.float32)
    mu, sd = Xt.mean(0), Xt.std(0) + 1e-6
    y_mu, y_sd = float(np.mean(y_train)), float(np.std(y_train)) + 1e-6
    yt = (torch.as_tensor(np.asarray(y_train), dtype=torch.float32) - y_mu) / y_sd
    Xv = (torch.as_tensor(np.asarray(X_val), dtype=torch.float32) - mu) / sd
    yv = (torch.as_tensor(np.asarray(y_val), dtype=torch.float32) - y_mu) / y_sd
    Xt = (Xt - mu) / sd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(Xt.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_state = math.inf, None
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(Xt), generator=gen).split(batch_size):
                loss = nn.functional.mse_loss(net(Xt[idx]).squeeze(-1), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                val = float(nn.functional.mse_loss(net(Xv).squeeze(-1), yv)) if len(Xv) else 0.0
            if val < best or best_state is None:
                best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = net((torch.as_tensor(np.asarray(X), dtype=torch.float32) - mu) / sd).squeeze(-1)
        return (z.double() * y_sd + y_mu).numpy()

    return predict


@dataclass
class LayerProbes:
    """Probes of one target across states: ``metrics[l]`` dicts and the ridge probe of each state."""

    target: str
    metrics: list[dict]
    probes: list[RidgeProbe] = field(repr=False)


def probe_layers(states_SNH: np.ndarray, values: np.ndarray, splits: Sequence[str], target: str = "",
                 lam: float = 0.1, mlp_hidden: int = 256, mlp_epochs: int = 10, seed: int = 0,
                 groups: Sequence[int] | None = None, progress: bool = False,
                 console: Console | None = None) -> LayerProbes:
    """Fit and score the probes of one target at every state.

    ``states_SNH`` [S, N, H]; ``values`` [N] (entries ≤ 0 or NaN — no usable answer — are left out);
    ``splits`` N × ``train``/``val``/``test``; ``groups`` [N] operand lengths (adds ``r2_within``). Per
    state: ``ridge`` and ``shuffled`` (ridge on permuted train labels) and, with ``mlp_epochs > 0``,
    ``mlp`` test metrics, plus ``w_norm`` = ‖w‖.
    """
    values = np.asarray(values, dtype=np.float64)
    splits = np.asarray(splits)
    ok = np.isfinite(values) & (values > 0)
    tr, va, te = (ok & (splits == s) for s in ("train", "val", "test"))
    if tr.sum() < 2 or te.sum() < 2:
        raise ProbeError(f"too few usable examples for target {target!r}: {int(tr.sum())} train, {int(te.sum())} "
                         "test; use more problems (--n) or more generated tokens (--max-new-tokens)")
    y = np.where(ok, np.log2(np.where(ok, values, 1.0)), np.nan)
    y_shuf = y[tr][np.random.default_rng(seed).permutation(int(tr.sum()))]
    g_te = None if groups is None else np.asarray(groups)[te]
    metrics, probes = [], []
    with _bar(progress, console) as bar:
        task = bar.add_task(f"probes {target}", total=len(states_SNH))
        for layer, X in enumerate(states_SNH):
            ridge, shuffled = fit_ridge(X[tr], np.stack([y[tr], y_shuf], 1), lam)
            row = {"layer": layer, "ridge": probe_metrics(ridge.predict(X[te]), values[te], g_te),
                   "shuffled": probe_metrics(shuffled.predict(X[te]), values[te], g_te),
                   "w_norm": float(np.linalg.norm(ridge.w))}
            if mlp_epochs > 0:
                mlp = fit_mlp_probe(X[tr], y[tr], X[va], y[va], mlp_hidden, mlp_epochs, seed + layer)
                row["mlp"] = probe_metrics(mlp(X[te]), values[te], g_te)
            metrics.append(row)
            probes.append(ridge)
            bar.advance(task)
    return LayerProbes(target, metrics, probes)


# --------------------------------------------------------------------------------------------------
# steering
# --------------------------------------------------------------------------------------------------
def steering_success(clean: Sequence[int], steered: Sequence[int | None], digits: int) -> list[bool]:
    """Per problem: the steered answer parses, lies below 10^(digits+1) and exceeds the clean one."""
    cap = 10 ** (digits + 1)
    return [o2 is not None and 0 < o2 < cap and o2 > o for o, o2 in zip(clean, steered, strict=True)]


def run_steering(model: nn.Module, tokenizer, probes: LayerProbes, settings: ProbeSettings, exclude: set,
                 progress: bool = False, console: Console | None = None) -> dict:
    """Steer fresh ``steer_digits``-digit problems along probe, random and null directions (see module doc).

    Returns ``layers``, ``n_parsed`` (problems whose clean answer parses), ``w_norm`` (‖W‖ per steered
    state: the probe's read-out rises by α‖W‖ log2 units along +W) and ``runs``: per α, ``conditions``
    {probe, random, null} → ``success``, ``unchanged``, ``unparsed``, ``mean_log2_change`` (of o′/o).
    """
    n_layers = len(residual_modules(model)) - 1
    layers = tuple(settings.steer_layers or default_steer_layers(n_layers))
    for layer in layers:
        if not 0 <= layer <= n_layers:
            raise ConfigError(f"steer layer {layer} does not exist: this model has residual states 0..{n_layers} "
                              "(0 = embeddings, l = output of block l-1)")
    problems = make_problems(max(settings.steer_n, 10), (settings.steer_digits,), settings.seed + 1,
                             exclude=exclude)[:settings.steer_n]
    ids = find_positions(tokenizer, [render_prompt(p, settings.prompt_variant) for p in problems]).input_ids
    gen = dict(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, progress=progress,
               console=console)
    clean = generate_answers(model, tokenizer, ids, desc="steering: clean", **gen)
    keep = [i for i, (_, o) in enumerate(clean) if o is not None]
    if not keep:
        raise ProbeError(f"the model gave no parseable answer to any of {len(problems)} steering problems; "
                         "look at problems.jsonl and raise --max-new-tokens, or pass --steer-n 0")
    ids = [ids[i] for i in keep]
    o_clean = [clean[i][1] for i in keep]
    H = probes.probes[0].w.shape[0]
    g = torch.Generator().manual_seed(settings.seed + 2)
    directions = {
        "probe": {layer: torch.as_tensor(probes.probes[layer].w, dtype=torch.float32) for layer in layers},
        "random": {layer: torch.randn(H, generator=g) for layer in layers},
        "null": dict.fromkeys(layers),
    }
    out = {"layers": list(layers), "digits": settings.steer_digits, "n_problems": len(problems),
           "n_parsed": len(keep), "direction_target": probes.target,
           "w_norm": {str(layer): float(np.linalg.norm(probes.probes[layer].w)) for layer in layers}, "runs": []}
    for alpha in settings.steer_alphas:
        run = {"alpha": alpha, "conditions": {}, "samples": []}
        steered_all = {}
        for name, dirs in directions.items():
            with steering(model, dirs, alpha):
                steered = generate_answers(model, tokenizer, ids, desc=f"steering α={alpha:g}: {name}", **gen)
            o2 = [o for _, o in steered]
            ok = steering_success(o_clean, o2, settings.steer_digits)
            both = [(a, b) for a, b in zip(o_clean, o2, strict=True) if b is not None and a > 0 and b > 0]
            run["conditions"][name] = {
                "success": float(np.mean(ok)), "n": len(ok),
                "unchanged": float(np.mean([a == b for a, b in zip(o_clean, o2, strict=True)])),
                "unparsed": float(np.mean([b is None for b in o2])),
                "mean_log2_change": float(np.mean([math.log2(b / a) for a, b in both])) if both else None}
            steered_all[name] = steered
        for j in range(min(5, len(keep))):
            p = problems[keep[j]]
            run["samples"].append({"a": p.a, "b": p.b, "clean": clean[keep[j]][0],
                                   **{k: v[j][0] for k, v in steered_all.items()}})
        out["runs"].append(run)
    return out


# --------------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------------
def _clean_json(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean_json(v) for v in x]
    return x


def best_layer(metrics: list[dict], key: str = "r2") -> int:
    """The state whose ridge probe has the highest test ``key`` (R² by default)."""
    scores = [m["ridge"][key] if m["ridge"][key] is not None else -math.inf for m in metrics]
    return int(np.argmax(scores))


def run_probes(model: nn.Module, tokenizer, settings: ProbeSettings | None = None, model_name: str = "",
               progress: bool = False, console: Console | None = None) -> dict:
    """Generate problems, read hidden states and answers, fit all probes, steer; returns the results dict.

    Keys: ``settings``, ``model`` (name, n_layers, hidden), ``data`` (counts, parsed answers, answer
    accuracy), ``layers`` ({target: per-state metrics}), ``best`` ({target: best state and its
    metrics}), ``baselines`` (R² from the digit count alone; the shuffled control's expected
    R²), ``skipped`` ({"o": why} when too few answers parse: then the steering direction comes
    from the ``sum`` probe), ``steering`` (or None; ``state_norm`` is the mean ‖h‖ at the last prompt
    token of each steered state, the scale α acts against), ``timings_s``, and ``problems`` (rows with the generated answer;
    :func:`write_results` writes these to problems.jsonl, not to results.json).
    """
    settings = settings or ProbeSettings()
    settings.validate()
    t0 = time.perf_counter()
    timings = {}
    problems = make_problems(settings.n_per_length, settings.lengths, settings.seed)
    tokens = find_positions(tokenizer, [render_prompt(p, settings.prompt_variant) for p in problems])
    states = collect_states(model, tokens, settings.batch_size, progress, console)
    timings["hidden_states"] = time.perf_counter() - t0
    t = time.perf_counter()
    answers = generate_answers(model, tokenizer, tokens.input_ids, settings.max_new_tokens, settings.batch_size,
                               progress, console)
    timings["answers"] = time.perf_counter() - t
    o = np.array([np.nan if ans is None else float(ans) for _, ans in answers])
    values = {"a": np.array([p.a for p in problems], dtype=np.float64),
              "b": np.array([p.b for p in problems], dtype=np.float64),
              "o": o, "sum": np.array([p.golden for p in problems], dtype=np.float64)}
    splits = [p.split for p in problems]
    digits = np.array([p.num_digits for p in problems])
    t = time.perf_counter()
    fitted, skipped = {}, {}
    for tgt in TARGETS:
        try:
            fitted[tgt] = probe_layers(states[TARGET_POSITION[tgt]], values[tgt], splits, tgt, settings.ridge_lambda,
                                       settings.mlp_hidden, settings.mlp_epochs, settings.seed, digits, progress,
                                       console)
        except ProbeError as e:
            if tgt != "o":      # a, b and the sum always have values; only the model's answer can be missing
                raise
            skipped[tgt] = str(e)
    timings["probes"] = time.perf_counter() - t
    steer = None
    if settings.steer_n > 0:
        t = time.perf_counter()
        steer = run_steering(model, tokenizer, fitted.get("o", fitted["sum"]), settings,
                             {(p.a, p.b) for p in problems}, progress, console)
        norms = np.linalg.norm(states["last"][steer["layers"]], axis=-1).mean(-1)     # [len(layers)]
        steer["state_norm"] = {str(layer): float(v) for layer, v in zip(steer["layers"], norms, strict=True)}
        timings["steering"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    n_layers = states["a"].shape[0] - 1
    correct = [ans == p.golden for p, (_, ans) in zip(problems, answers, strict=True)]
    best = {}
    for tgt, lp in fitted.items():
        b = best_layer(lp.metrics)
        best[tgt] = {"layer": b, **lp.metrics[b]["ridge"], "mlp_r2": lp.metrics[b].get("mlp", {}).get("r2"),
                     "shuffled_r2": lp.metrics[b]["shuffled"]["r2"]}
    test = np.array(splits) == "test"
    baselines = {}
    for tgt in fitted:
        use = test & np.isfinite(values[tgt]) & (values[tgt] > 0)
        baselines[tgt] = length_baseline_r2(values[tgt][use], digits[use])
    n_train, hidden = int((np.array(splits) == "train").sum()), int(states["a"].shape[2])
    rows = [{**p.as_dict(), "prompt": render_prompt(p, settings.prompt_variant).text, "generated": txt, "o": ans}
            for p, (txt, ans) in zip(problems, answers, strict=True)]
    return _clean_json({
        "settings": asdict(settings) | {"steer_layers": steer["layers"] if steer else settings.steer_layers},
        "model": {"name": model_name, "n_layers": n_layers, "hidden": hidden},
        "data": {"n": len(problems), "splits": {s: splits.count(s) for s in ("train", "val", "test")},
                 "answers_parsed": int(np.isfinite(o).sum()), "answer_accuracy": float(np.mean(correct)),
                 "template": PROMPT_TEMPLATES[settings.prompt_variant]},
        "layers": {tgt: lp.metrics for tgt, lp in fitted.items()},
        "best": best,
        # R² a probe reaches from the digit count alone, and the shuffled control's expected R² from
        # overfitting noise with H features on n_train examples (≈ −H/(n_train − H) for least squares)
        "baselines": {"length_only_r2": baselines,
                      "shuffled_r2_expected": -hidden / (n_train - hidden) if n_train > hidden + 1 else None},
        "skipped": skipped,
        "steering": steer,
        "timings_s": timings,
        "problems": rows,
    })


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
_COLORS = {"a": "tab:blue", "b": "tab:orange", "o": "tab:green", "sum": "tab:red"}


def plot_probes(results: dict, path: Path) -> Path:
    """Ridge-probe ρ, R², R² within one operand length and AAcc against the residual state (PNG, atomic).

    One colour per target; the R² panels add the MLP probe (dashed), the R² panel the shuffled-label
    control (dotted) and the length-only baselines (thin grey); the steered states are shaded.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from moelab.analysis.isoflop import write_atomic

    def col(rows, kind, key):
        return [np.nan if r.get(kind, {}).get(key) is None else r[kind][key] for r in rows]

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    steer = results.get("steering") or {}
    panels = (("rho", "Pearson ρ (test)"), ("r2", "R² (test)"), ("r2_within", "R² within one operand length (test)"),
              ("aacc", "AAcc: |2^pred − x| < 1% of x (test)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for tgt, rows in results["layers"].items():
            xs = [r["layer"] for r in rows]
            ax.plot(xs, col(rows, "ridge", key), color=_COLORS.get(tgt), marker=".", label=f"{tgt} ridge")
            if key in ("r2", "r2_within") and "mlp" in rows[0]:
                ax.plot(xs, col(rows, "mlp", key), color=_COLORS.get(tgt), ls="--", lw=1, label=f"{tgt} MLP")
            if key == "r2":
                ax.plot(xs, col(rows, "shuffled", key), color=_COLORS.get(tgt), ls=":", lw=1,
                        label=f"{tgt} shuffled labels")
        if key == "r2":
            for tgt, base in (results.get("baselines", {}).get("length_only_r2") or {}).items():
                if base is not None:
                    ax.axhline(base, color=_COLORS.get(tgt), lw=0.6, alpha=0.5)
        if steer.get("layers"):
            ax.axvspan(min(steer["layers"]) - 0.5, max(steer["layers"]) + 0.5, color="0.9", zorder=0)
        ax.set_xlabel("residual state (0 = embeddings, l = output of block l−1)")
        ax.set_title(label, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[1:3]:
        ax.set_ylim(max(-1.05, ax.get_ylim()[0]), 1.02)
    axes[3].set_ylim(-0.02, 1.02)
    axes[0].legend(*axes[1].get_legend_handles_labels(), fontsize=7, ncol=3, loc="center")   # ρ has room
    name = results["model"].get("name") or "model"
    title = f"Linear number probes — {name} ({results['data']['n']} problems, log2 targets)"
    if steer:
        runs = "; ".join(f"α={r['alpha']:g}: {r['conditions']['probe']['success']:.2f} / "
                         f"{r['conditions']['random']['success']:.2f} / {r['conditions']['null']['success']:.2f}"
                         for r in steer["runs"])
        title += (f"\nsteering at states {min(steer['layers'])}–{max(steer['layers'])} (shaded), success probe / "
                  f"random / null direction: {runs}")
    fig.suptitle(title, fontsize=10)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(Path(path), buf.getvalue())
    return Path(path)


def write_results(results: dict, out: Path) -> dict[str, Path]:
    """Write ``out/results.json`` (without the problem rows), ``out/problems.jsonl`` and ``out/probes.png``,
    each atomically (temporary file, then rename)."""
    from moelab.analysis.isoflop import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results.get("problems", [])
    summary = {k: v for k, v in results.items() if k != "problems"}
    paths = {"problems": out / "problems.jsonl", "png": out / "probes.png", "results": out / "results.json"}
    write_atomic(paths["problems"], "".join(json.dumps(r) + "\n" for r in rows))
    plot_probes(summary, paths["png"])
    write_atomic(paths["results"], json.dumps(summary, indent=2) + "\n")
    return paths


__all__ = ["TARGETS", "LayerProbes", "ProbeError", "ProbeSettings", "RidgeProbe", "capture_states",
           "collect_states", "default_steer_layers", "fit_mlp_probe", "fit_ridge", "generate_answers",
           "length_baseline_r2",
           "probe_layers", "probe_metrics", "residual_modules", "run_probes", "run_steering", "steering",
           "steering_success", "write_results"]
