"""``moelab analyze ...``: look inside a model (docs/methods.md §5, §7).

    moelab analyze routing runs/demo/model runs/data/shakespeare runs/tasks/arith-train.jsonl \\
        --out runs/analysis/routing
    moelab analyze activation smollm2 shakespeare runs/tasks/arith-train.jsonl --sparsity 0.5 \\
        --out runs/analysis/smollm2

DATA is a token directory (``moelab data prepare``; its ``--split``, default val), an SFT JSON Lines file
(prompt/completion or messages) or a text source (``shakespeare``, a directory, a glob, a text file). MODEL
is ``smollm2`` or a checkpoint directory (moelab/DeepSeek or any transformers causal LM).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moelab.cli_utils import check_out_dir, err, friendly, resolve_device

analyze_app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Look inside a model: routed-expert load and overlap between datasets; gradient-based parameter "
         "activation, LLMDcos and activation-guided Wanda pruning; linear number probes.",
)
# Commands: routing, activation (below) and probes (linear number probes, docs/methods.md §8: probes_cli.py,
# registered at the end of this file).

_Model = Annotated[str, typer.Argument(help="'smollm2' or a checkpoint directory.", show_default=False)]
_Out = Annotated[Path, typer.Option("--out", "-o", help="Directory for the JSON and PNG files.")]
_SeqLen = Annotated[int, typer.Option(min=2, help="Tokens per sequence (at most).")]
_Split = Annotated[str, typer.Option(help="Split of token directories.")]
_Seed = Annotated[int, typer.Option(min=0, help="Seed of the windows / documents / examples drawn.")]
_Field = Annotated[str, typer.Option(help="JSONL field / Parquet column of text sources.")]
_Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when available).")]
_Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
_WITHIN = " within (half vs half)"


def _load(model: str, device: str):
    """``(model, tokenizer)`` on ``device`` (already checked with :func:`resolve_device`)."""
    from moelab.interop.hf_lm import load_causal_lm

    m, tok = load_causal_lm(model)
    return m.to(device), tok


@analyze_app.command()
@friendly
def routing(
    model: _Model,
    data: Annotated[list[str], typer.Argument(help="One or more datasets to compare.", show_default=False)],
    out: _Out,
    samples: Annotated[int, typer.Option(min=1, help="Sequences per dataset.")] = 64,
    seq_len: _SeqLen = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 8,
    coverage: Annotated[float, typer.Option(help="Load share the per-layer cover set must reach (Jaccard).")]
    = 0.5,
    split: _Split = "val",
    seed: _Seed = 0,
    text_field: _Field = "text",
    device: _Device = "auto",
    quiet: _Quiet = False,
):
    """Per MoE layer and routed expert: load share, top-n concentration, normalised entropy, the smallest
    expert set covering COVERAGE of the load; between datasets: Jaccard of those sets, cosine and JS
    divergence of the load vectors. Writes routing.json, routing_load.png and routing_overlap.png."""
    from moelab.analysis.routing import collect_routing, routed_layers, routing_report
    from moelab.analysis.routing_plots import plot_routing_load, plot_routing_overlap
    from moelab.common.jsonio import write_json
    from moelab.data.samples import check_data, load_samples, unique_names
    from moelab.errors import ConfigError

    if not 0 < coverage <= 1:
        raise ConfigError(f"--coverage must be in (0, 1] (got {coverage})")
    check_out_dir(out)
    device = resolve_device(device)
    for spec in data:
        check_data(spec, split, text_field)
    t0 = time.perf_counter()
    m, tok = _load(model, device)
    routed_layers(m)                                     # fail before reading data
    stats = []
    for spec, name in zip(data, unique_names(data), strict=True):
        seqs = load_samples(spec, tok, samples, seq_len, seed=seed, split=split, text_field=text_field,
                            vocab_size=m.config.vocab_size)
        stats.append(collect_routing(m, seqs, name=name, batch_size=batch_size, progress=not quiet))
    report = routing_report(stats, coverage)
    report.update(model=model, data=dict(zip(report["names"], data, strict=True)), seq_len=seq_len,
                  seconds=round(time.perf_counter() - t0, 2))
    files = [write_json(out / "routing.json", report), plot_routing_load(stats, out / "routing_load.png")]
    if len(stats) > 1:
        files.append(plot_routing_overlap(report, out / "routing_overlap.png"))
    if not quiet:
        _routing_tables(report)
    err.print(f"wrote {', '.join(escape(str(f)) for f in files)} ({report['seconds']:.1f} s)", highlight=False)


def _routing_tables(report: dict) -> None:
    con = Console()
    K, E = report["top_k"], report["n_routed_experts"]
    t = Table(title=f"Routed-expert load (E={E}, K={K}; balanced: top-{K} = {K / E:.2f}, entropy 1)",
              title_justify="left")
    for col in ("dataset", "tokens", "entropy", "top-1", f"top-{K}", f"{report['coverage']:.0%} cover", "MaxVio"):
        t.add_column(col, justify="right" if col != "dataset" else "left")
    for name, d in report["datasets"].items():
        mean = d["mean"]
        t.add_row(escape(name), f"{d['tokens']:,}", f"{mean['entropy']:.3f}", f"{mean['top_n'].get('1', 0):.3f}",
                  f"{mean['top_n'].get(str(K), 0):.3f}", f"{mean['cover_size']:.1f}", f"{mean['max_vio']:.2f}")
    t.caption = "means over MoE layers"
    con.print(t)
    if report["overlap"]:
        o = Table(title="Overlap between datasets (mean over MoE layers)", title_justify="left")
        for col in ("pair", "Jaccard", "cosine", "JS (bits)"):
            o.add_column(col, justify="right" if col != "pair" else "left")
        for pair, v in report["overlap"].items():
            m = v["mean"]
            o.add_row(escape(pair.replace("|", " vs ")), f"{m['jaccard']:.3f}", f"{m['cosine']:.3f}", f"{m['js']:.3f}")
        con.print(o)


@analyze_app.command()
@friendly
def activation(
    model: _Model,
    data: Annotated[list[str], typer.Argument(help="DATA [DATA2]: one dataset, or two to compare (LLMDcos).",
                                              show_default=False)],
    out: _Out,
    samples: Annotated[int, typer.Option(min=1, help="Samples per dataset (one backward each; the paper: 64).")]
    = 16,
    seq_len: _SeqLen = 256,
    shots: Annotated[int, typer.Option(min=0, help="Solved examples before the question in samples drawn "
                                                   "from SFT files (the paper: 3).")] = 3,
    activation_threshold: Annotated[float, typer.Option(
        help="γ: A > γ counts as activated. [UNCERTAIN] paper 2e-5 (32 layers) / 5e-6 (40 layers), code 2e-6; "
             "in quantile mode a quantile in [0, 1).")] = 2e-5,
    activation_threshold_mode: Annotated[str, typer.Option(help="absolute or quantile.")] = "absolute",
    max_dim: Annotated[int, typer.Option(min=1, help="Scope: matrices whose largest dim is at most this.")]
    = 15000,
    sparsity: Annotated[list[float] | None, typer.Option(
        help="Prune with Wanda at this overall sparsity, uniform and layer-wise (repeatable).")] = None,
    alpha: Annotated[float, typer.Option(help="α of the layer-wise ratios.")] = 2.0,
    beta: Annotated[float, typer.Option(help="β of the layer-wise ratios.")] = 0.2,
    calib: Annotated[str | None, typer.Option(help="Calibration data for Wanda (default: DATA).")] = None,
    calib_samples: Annotated[int, typer.Option(min=1, help="Calibration sequences.")] = 16,
    eval_data: Annotated[str | None, typer.Option("--eval", help="Perplexity data (default: DATA).")] = None,
    eval_samples: Annotated[int, typer.Option(min=1, help="Perplexity sequences.")] = 16,
    sequential: Annotated[bool, typer.Option(help="Calibrate layer i on the outputs of the already pruned "
                                                  "layers (Wanda's code) instead of the dense model.")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass (pruning, perplexity).")]
    = 4,
    split: _Split = "val",
    seed: _Seed = 0,
    text_field: _Field = "text",
    device: _Device = "auto",
    quiet: _Quiet = False,
):
    """Gradient-based parameter activation A = |w·∂D/∂w| (D: top next-token logit), activated weights per
    layer, LLMDcos between DATA and DATA2 (and between the two halves of each, a within-domain baseline),
    and with --sparsity: Wanda with uniform vs activation-based layer-wise ratios, with perplexity.
    Writes activation.json, activation_counts.png, llmdcos.png and pruning.png."""
    from moelab.analysis.activation import PUBLISHED_THRESHOLDS, llmdcos, parameter_activation
    from moelab.analysis.pruning import layerwise_sparsity
    from moelab.data.samples import check_data, data_kind, load_samples, unique_names

    _check_activation_options(data, out, activation_threshold, activation_threshold_mode, sparsity, alpha, beta)
    device = resolve_device(device)
    for spec in dict.fromkeys([*data, *(s for s in (calib, eval_data) if s is not None and sparsity)]):
        check_data(spec, split, text_field)
    t0 = time.perf_counter()
    m, tok = _load(model, device)
    vocab = m.config.vocab_size
    timings: dict[str, float] = {}
    names = unique_names(data)
    scores = []
    for spec, name in zip(data, names, strict=True):
        t = time.perf_counter()
        seqs = load_samples(spec, tok, samples, seq_len, seed=seed, split=split, text_field=text_field,
                            vocab_size=vocab, shots=shots if data_kind(spec) == "sft" else None)
        a = parameter_activation(m, seqs, name=name, max_dim=max_dim, progress=not quiet)
        a.meta.update(spec=spec, tokens=sum(len(s) for s in seqs))
        scores.append(a)
        timings[f"activation {name}"] = round(time.perf_counter() - t, 2)
        err.print(f"{name}: {len(seqs)} samples, {a.meta['tokens']:,} tokens, "
                  f"{timings[f'activation {name}']:.1f} s", highlight=False)
    first = scores[0]
    gamma = first.threshold(activation_threshold, activation_threshold_mode)
    sizes = first.layer_sizes()
    layers = first.layers
    counts = {a.name: a.counts(gamma) for a in scores}
    result: dict = {
        "model": model, "layers": layers, "layer_sizes": sizes, "samples": samples, "seq_len": seq_len,
        "threshold": {"value": activation_threshold, "mode": activation_threshold_mode, "gamma": gamma,
                      "published": PUBLISHED_THRESHOLDS},
        "datasets": {}, "llmdcos": {},
    }
    for a in scores:
        d = {"spec": a.meta["spec"], "samples": a.n_samples, "tokens": a.meta["tokens"],
             "counts": counts[a.name], "share": {i: counts[a.name][i] / sizes[i] for i in layers},
             "counts_at_published": {k: a.counts(v) for k, v in PUBLISHED_THRESHOLDS.items()},
             "per_layer": a.summary()}
        experts = a.expert_counts(gamma)
        if experts:
            d["expert_counts"] = experts
        result["datasets"][a.name] = d
    curves: dict[str, dict[int, float]] = {}
    if len(scores) == 2:
        curves[f"{names[0]} vs {names[1]}"] = llmdcos(scores[0], scores[1])
    for a in scores:
        if a.n[1] > 0:
            curves[f"{a.name}{_WITHIN}"] = llmdcos(a, a, 0, 1)
    result["llmdcos"] = curves
    files = []
    pruning_runs: dict[str, dict[float, float]] = {}
    ratios_by_s: dict[float, dict[int, float]] = {}
    dense_ppl = None
    for S in sparsity or []:
        ratios_by_s[S] = dict(zip(layers, layerwise_sparsity([counts[first.name][i] for i in layers], S, alpha,
                                                             beta).tolist(), strict=True))
    if sparsity:
        t = time.perf_counter()
        dense_ppl, pruning_runs, runs = _prune_sweep(
            m, tok, data[0], calib, eval_data, calib_samples, eval_samples, seq_len, split, seed, text_field,
            vocab, ratios_by_s, batch_size, sequential, max_dim, quiet)
        timings["pruning"] = round(time.perf_counter() - t, 2)
        result["pruning"] = {"dense_ppl": dense_ppl, "alpha": alpha, "beta": beta, "sequential": sequential,
                             "calib": calib or data[0], "eval": eval_data or data[0], "ratios_from": names[0],
                             "ratios": ratios_by_s, "runs": runs}
    timings["total"] = round(time.perf_counter() - t0, 2)
    result["seconds"] = timings
    files.append(_write(result, out))
    files += _plots(result, counts, sizes, gamma, ratios_by_s, curves, pruning_runs, dense_ppl, out)
    if not quiet:
        _activation_tables(result, counts, sizes, curves)
    err.print(f"wrote {', '.join(escape(str(f)) for f in files)} ({timings['total']:.1f} s)", highlight=False)


def _check_activation_options(data, out, threshold, mode, sparsity, alpha, beta) -> None:
    """Every check of `analyze activation`'s options that needs no model: run before any work or file."""
    import math

    from moelab.analysis.activation import THRESHOLD_MODES
    from moelab.errors import ConfigError

    if len(data) > 2:
        raise ConfigError(f"give one or two datasets (got {len(data)}); compare more with several runs")
    if mode not in THRESHOLD_MODES:
        raise ConfigError(f"--activation-threshold-mode {mode!r} is unknown; use one of {', '.join(THRESHOLD_MODES)}")
    if mode == "absolute" and not (threshold >= 0 and math.isfinite(threshold)):
        raise ConfigError(f"--activation-threshold must be a number >= 0 in absolute mode (got {threshold})")
    if mode == "quantile" and not 0 <= threshold < 1:
        raise ConfigError(f"--activation-threshold must be in [0, 1) in quantile mode (got {threshold}); e.g. 0.9 "
                          "counts the top 10% of weights as activated")
    for S in sparsity or []:
        if not 0 <= S < 1:
            raise ConfigError(f"--sparsity must be in [0, 1) (got {S}); e.g. --sparsity 0.5 prunes half the weights")
    if not math.isfinite(alpha):
        raise ConfigError(f"--alpha must be a finite number (got {alpha}); the paper uses 2")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ConfigError(f"--beta must be a finite number >= 0 (got {beta}); the paper uses 0.2")
    check_out_dir(out)


def _prune_sweep(m, tok, default_spec, calib, eval_data, n_calib, n_eval, seq_len, split, seed, text_field,
                 vocab, ratios_by_s, batch_size, sequential, max_dim, quiet):
    """Dense perplexity, then Wanda uniform and layer-wise at every sparsity (weights restored between runs)."""
    from moelab.analysis.pruning import perplexity, restore, snapshot, wanda_prune
    from moelab.data.samples import load_samples

    calib_spec, eval_spec = calib or default_spec, eval_data or default_spec

    def load(spec, n, s):
        return load_samples(spec, tok, n, seq_len, seed=s, split=split, text_field=text_field, vocab_size=vocab)

    if calib_spec == eval_spec:             # one draw, split: the two sets share no document / example row
        both = load(calib_spec, n_calib + n_eval, seed + 1)
        calib_seqs, eval_seqs = both[:n_calib], both[n_calib:]
    else:
        calib_seqs, eval_seqs = load(calib_spec, n_calib, seed + 1), load(eval_spec, n_eval, seed + 2)
    if not eval_seqs:
        eval_seqs = calib_seqs
        err.print("[yellow]warning:[/] the evaluation data gave no sequences beyond the calibration ones; "
                  "perplexity is measured on the calibration sequences", highlight=False)
    dense = perplexity(m, eval_seqs, batch_size, progress=not quiet)
    err.print(f"dense perplexity {dense:.3f} ({sum(len(s) for s in eval_seqs):,} tokens)", highlight=False)
    saved = snapshot(m, max_dim)
    curves: dict[str, dict[float, float]] = {"uniform": {}, "layer-wise": {}}
    runs = []
    try:
        for S, ratios in ratios_by_s.items():
            for method, target in (("uniform", S), ("layer-wise", ratios)):
                t = time.perf_counter()
                rep = wanda_prune(m, calib_seqs, target, batch_size=batch_size, sequential=sequential,
                                  max_dim=max_dim, progress=not quiet)
                ppl = perplexity(m, eval_seqs, batch_size, progress=not quiet)
                restore(m, saved)
                curves[method][S] = ppl
                runs.append({"method": method, "sparsity": S, "achieved": rep["sparsity"], "ppl": ppl,
                             "seconds": round(time.perf_counter() - t, 2),
                             "layers": {i: v["sparsity"] for i, v in rep["layers"].items()}})
                err.print(f"Wanda {method} S={S}: achieved {rep['sparsity']:.4f}, perplexity {ppl:.3f} "
                          f"({runs[-1]['seconds']:.1f} s)", highlight=False)
    finally:
        restore(m, saved)
    return dense, curves, runs


def _write(result: dict, out: Path) -> Path:
    from moelab.common.jsonio import write_json

    def keys(o):
        if isinstance(o, dict):
            return {str(k): keys(v) for k, v in o.items()}
        if isinstance(o, list):
            return [keys(v) for v in o]
        return o

    return write_json(out / "activation.json", keys(result))


def _plots(result, counts, sizes, gamma, ratios_by_s, curves, pruning_runs, dense_ppl, out: Path) -> list[Path]:
    from moelab.analysis.activation import plot_activation, plot_llmdcos
    from moelab.analysis.pruning import plot_pruning

    S0 = next(iter(ratios_by_s), None)
    files = [plot_activation(counts, sizes, gamma, out / "activation_counts.png",
                             ratios=ratios_by_s.get(S0), sparsity=S0)]
    if curves:
        files.append(plot_llmdcos(curves, out / "llmdcos.png"))
    if pruning_runs:
        files.append(plot_pruning(pruning_runs, out / "pruning.png", dense_ppl))
    return files


def _activation_tables(result, counts, sizes, curves) -> None:
    con = Console()
    names = list(counts)
    t = Table(title=f"Share of weights activated (A > γ = {result['threshold']['gamma']:.3g}) and LLMDcos per layer",
              title_justify="left")
    t.add_column("layer", justify="right")
    for n in names:
        t.add_column(f"share\n{escape(n)}", justify="right")
    for label in curves:
        short = f"within\n{label.split(' within')[0]}" if label.endswith(_WITHIN) else "cross"
        t.add_column(f"LLMDcos\n{escape(short)}", justify="right")
    ratios = (result.get("pruning") or {}).get("ratios") or {}
    S0 = next(iter(ratios), None)
    if S0 is not None:
        t.add_column(f"S_i (S={S0})", justify="right")
    for i in result["layers"]:
        row = [str(i)] + [f"{counts[n][i] / sizes[i]:.3f}" for n in names]
        row += [f"{c[i]:.3f}" for c in curves.values()]
        if S0 is not None:
            row.append(f"{ratios[S0][i]:.3f}")
        t.add_row(*row)
    con.print(t)
    runs = (result.get("pruning") or {}).get("runs")
    if runs:
        p = Table(title=f"Wanda pruning (dense perplexity {result['pruning']['dense_ppl']:.3f})", title_justify="left")
        for col in ("ratios", "target S", "achieved", "perplexity", "seconds"):
            p.add_column(col, justify="right" if col != "ratios" else "left")
        for r in runs:
            p.add_row(r["method"], f"{r['sparsity']:.2f}", f"{r['achieved']:.4f}", f"{r['ppl']:.3f}",
                      f"{r['seconds']:.1f}")
        con.print(p)


def _register_probes() -> None:
    from moelab.analysis.probes_cli import probes

    analyze_app.command("probes")(probes)


_register_probes()
