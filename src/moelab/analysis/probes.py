"""Linear number probes (docs/methods.md §8; Zhu et al., arXiv 2401.03735): do a model's hidden states hold
the values of the numbers in an addition prompt, linearly, layer by layer — and does pushing a hidden
state along a probe's direction change the model's answer?

    model, tok = load_causal_lm("smollm2")
    res = run_probes(model, tok, ProbeSettings(n_per_length=200))
    write_results(res, Path("runs/probes"))        # results.json, probes.png, problems.jsonl

Modules: :mod:`.probes_data` (problems, prompts, token positions, answer parsing), :mod:`.probes_settings`
(:class:`ProbeSettings`), :mod:`.probes_model` (residual states, steering hooks, greedy answers),
:mod:`.probes_fit` (ridge and MLP probes, metrics), :mod:`.probes_files` (files and the figure); this one
runs them (:func:`run_probes`, :func:`run_steering`) and re-exports their public names.

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

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from moelab.analysis.probes_data import PROMPT_TEMPLATES, find_positions, make_problems, render_prompt
from moelab.analysis.probes_files import write_results
from moelab.analysis.probes_fit import (
    LayerProbes,
    RidgeProbe,
    fit_mlp_probe,
    fit_ridge,
    length_baseline_r2,
    probe_layers,
    probe_metrics,
)
from moelab.analysis.probes_model import (
    capture_states,
    collect_states,
    generate_answers,
    residual_modules,
    steering,
)
from moelab.analysis.probes_settings import (
    TARGET_POSITION,
    TARGETS,
    ProbeError,
    ProbeSettings,
    default_steer_layers,
)
from moelab.common.jsonio import finite
from moelab.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console


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
    token of each steered state, the scale α acts against), ``timings_s``, and ``problems`` (rows with
    the generated answer; :func:`write_results` writes these to problems.jsonl, not to results.json).
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
    return finite({
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


__all__ = ["TARGETS", "LayerProbes", "ProbeError", "ProbeSettings", "RidgeProbe", "best_layer", "capture_states",
           "collect_states", "default_steer_layers", "fit_mlp_probe", "fit_ridge", "generate_answers",
           "length_baseline_r2",
           "probe_layers", "probe_metrics", "residual_modules", "run_probes", "run_steering", "steering",
           "steering_success", "write_results"]
