"""IsoFLOP sweeps: find the compute-optimal model scale on a local corpus (DeepSeek LLM §3.2).

For each compute budget C the sweep trains a handful of model shapes (L layers of width d), each on
``D = C/M`` tokens, where ``M = 72·L·d² + 12·L·d·l_seq`` (:mod:`moelab.scaling.laws`), and records
the final validation bits per byte. Then:

* **per budget** a parabola ``loss = c2·x² + c1·x + c0`` in ``x = log10 M``; its vertex
  ``x* = −c1/(2·c2)`` gives ``M_opt(C) = 10^x*`` and ``D_opt(C) = C / M_opt(C)``. A budget counts only
  when the parabola is convex and its vertex lies inside the sampled M range;
* **across budgets** a least-squares line in log-log space: ``M_opt = k·C^a`` and ``D_opt = C/M_opt =
  (1/k)·C^b`` with ``b = 1 − a`` (exactly, since D_opt is derived from M_opt). DeepSeek LLM found
  a = 0.5243 (Chinchilla 0.49, OpenAI 0.73).

The plan (settings, shapes, hyper-parameters) is :mod:`moelab.scaling.isoflop_plan`, the fits
:mod:`moelab.scaling.isoflop_fit`, the figure :mod:`moelab.scaling.plots`.

**Evaluation.** The final validation loss over the whole val split (at most ``eval_tokens`` tokens,
consecutive windows: the same tokens for every run), converted to bits per byte.

**Files** in OUT (each written atomically: temp file + rename)::

    results.json             format, data, settings, one row per run, the fit
    isoflop.png              IsoFLOP curves (loss vs M per budget, fitted parabolas, minima) and
                             M_opt, D_opt vs C with the fitted power laws (paper's law dashed)
    runs/<name>/             one training run (moelab.train.loop.train): metrics.jsonl, model/, report/
    runs/<name>/run.json     what the run is (config, budget, M, D), written before it starts
    runs/<name>/result.json  its outcome, written when it ends; a run with one is never retrained

JSON is written by :func:`moelab.common.jsonio.write_json`: a non-finite number (a diverged run's loss)
is ``null``, and :func:`result_row` makes a finished run's null loss NaN again when it is read back.

Running the same sweep again skips finished runs and resumes an interrupted one from its checkpoint;
a run directory whose ``run.json`` disagrees with the current settings is an error, not overwritten.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moelab.common.atomic import check_not_cwd
from moelab.common.jsonio import dumps, write_json
from moelab.errors import ConfigError, DataError, MoelabError
from moelab.scaling.isoflop_fit import fit_isoflop
from moelab.scaling.isoflop_plan import PlannedRun, SweepSettings, plan_sweep, run_config
from moelab.scaling.plots import plot_isoflop

FORMAT = "moelab-isoflop-v1"


# --- files ---------------------------------------------------------------------------------------

#: The losses of a finished run's result row; a non-finite one (a diverged run) is written as null.
RESULT_LOSSES = ("val_bpb", "val_loss")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; delete it to redo that part of the sweep") from None


def result_row(row):
    """A result row as read back from JSON, made the same as the row that was written.

    Files are written by :func:`moelab.common.jsonio.write_json`, which turns NaN into null; a finished
    run's null loss is NaN again here (a failed run's ``val_bpb`` was None to begin with and stays None).
    """
    if isinstance(row, dict) and row.get("status") == "finished":
        return {**row, **{k: math.nan for k in RESULT_LOSSES if k in row and row[k] is None}}
    return row


def collect_rows(out_dir: Path) -> list[dict]:
    """The ``result.json`` rows of every run under ``OUT/runs`` (finished or failed), by budget and M."""
    rows = [result_row(_read_json(p)) for p in sorted((Path(out_dir) / "runs").glob("*/result.json"))]
    rows = [r for r in rows if isinstance(r, dict) and "budget" in r and "M" in r]
    return sorted(rows, key=lambda r: (r["budget"], r["M"]))


#: What a sweep writes into OUT (temporary siblings of results.json / isoflop.png aside).
SWEEP_ENTRIES = ("results.json", "isoflop.png", "runs")


def check_sweep_dir(out: Path) -> None:
    """A sweep writes only into a new or empty directory, or one of its own (which it resumes): never
    over a user's files. Raises DataError (one line) otherwise."""
    check_not_cwd(out, "--out", DataError)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory for the sweep")
    if out.is_dir():
        foreign = sorted(e for e in os.listdir(out) if e not in SWEEP_ENTRIES and not e.startswith("."))
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise DataError(f"--out {out} is not an IsoFLOP sweep directory (it holds {shown}); moelab never "
                            "writes into a directory it did not make — choose a new --out")
        results = out / "results.json"
        if results.is_file():
            try:
                ours = json.loads(results.read_text(encoding="utf-8")).get("format") == FORMAT
            except (OSError, ValueError, AttributeError):
                ours = False
            if not ours:
                raise DataError(f"--out {out}: {results.name} is not an IsoFLOP sweep's results file; moelab "
                                "never overwrites what it did not write — choose a new --out")


def load_results(out_dir: str | os.PathLike) -> dict:
    """``OUT/results.json`` (the runs of the last sweep into OUT); without one, the rows of every
    ``OUT/runs/*/result.json`` (e.g. after results.json was deleted)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise DataError(f"{out} is not a directory; give the --out directory of `moelab scaling isoflop`")
    if (out / "results.json").is_file():
        res = _read_json(out / "results.json")
        if not isinstance(res, dict) or res.get("format") != FORMAT:
            got = res.get("format") if isinstance(res, dict) else None
            raise DataError(f"{out / 'results.json'} has format {got!r}, not {FORMAT!r}")
        if isinstance(res.get("runs"), list):
            res["runs"] = [result_row(r) for r in res["runs"]]
    else:
        res = {"format": FORMAT, "runs": collect_rows(out)}
    if not res.get("runs"):
        raise DataError(f"{out} holds no IsoFLOP results (no results.json, no runs/*/result.json); run "
                        f"`moelab scaling isoflop DATA_DIR --out {out}` first")
    return res


def refit(out_dir: str | os.PathLike) -> dict:
    """Fit and plot again from OUT's results; rewrites ``results.json`` and ``isoflop.png``."""
    out = Path(out_dir)
    res = load_results(out)
    res["fit"] = fit_isoflop(res["runs"])
    write_json(out / "results.json", res)
    plot_isoflop(res["runs"], res["fit"], out / "isoflop.png")
    return res


# --- the sweep -----------------------------------------------------------------------------------

@dataclass
class SweepResult:
    out_dir: Path
    rows: list[dict]
    fit: dict
    complete: bool              # False when interrupted (Ctrl-C); run again to resume
    trained: int = 0            # runs trained (or resumed) in this call
    cached: int = 0             # runs skipped because they had finished before
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)   # about the runs (data repeated); the fit has its own


def _fingerprint(meta: dict) -> dict:
    sp = meta.get("splits", {})
    return {"vocab_size": meta.get("vocab_size"), "train_tokens": sp.get("train", {}).get("tokens"),
            "val_tokens": sp.get("val", {}).get("tokens"), "val_bytes": sp.get("val", {}).get("bytes")}


def _spec(run: PlannedRun, cfg, fingerprint: dict) -> dict:
    rc = json.loads(cfg.model_dump_json())
    rc["data"].pop("path", None)   # the corpus is identified by its fingerprint, so it may move
    rc["train"].pop("threads", None)  # does not change the result
    return {"run": asdict(run), "run_config": rc, "data": fingerprint}


def run_sweep(data_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: SweepSettings, *,
              progress: bool = True, console=None, keep_checkpoints: bool = False,
              train_fn: Callable | None = None) -> SweepResult:
    """Train every planned run not finished yet, then fit and plot. See the module docstring.

    ``progress`` shows a line per run (on ``console``, default stderr) and the training bar.
    ``keep_checkpoints=False`` deletes a finished run's ``checkpoints/`` (its ``model/`` stays).
    ``train_fn`` replaces :func:`moelab.train.loop.train` (tests).
    """
    import shutil

    from moelab.data.tokens import read_meta
    from moelab.train.state import latest_checkpoint

    if train_fn is None:
        from moelab.train.loop import train as train_fn
    data_dir, out = Path(data_dir), Path(out_dir)
    meta = read_meta(data_dir)  # DataError when missing or not a token directory
    fp = _fingerprint(meta)
    vocab = int(meta["vocab_size"])
    n_val = int(fp["val_tokens"] or 0)
    if n_val < settings.seq_len + 1:
        raise DataError(f"the val split of {data_dir} has {n_val} tokens, fewer than --seq-len + 1 = "
                        f"{settings.seq_len + 1}; prepare it with more validation data or lower --seq-len")
    if console is None:
        from rich.console import Console
        console = Console(stderr=True)

    def say(msg: str) -> None:
        if progress:
            console.print(msg, highlight=False)

    check_sweep_dir(out)
    plan = plan_sweep(settings)
    n_train = int(fp["train_tokens"] or 0)
    out.mkdir(parents=True, exist_ok=True)
    total_c = sum(r.C for r in plan)
    say(f"IsoFLOP sweep: {len(plan)} runs over {len(settings.budgets)} budgets, {total_c:.3g} FLOPs in all "
        f"(M·D), into {out}")
    rows: list[dict] = []
    trained = cached = 0
    complete = True
    notes: list[str] = []

    def save() -> dict:
        fit = fit_isoflop(rows)
        write_json(out / "results.json", {
            "format": FORMAT, "data": str(data_dir), "data_fingerprint": fp, "settings": settings.as_dict(),
            "m_definition": "M = 72·L·d² + 12·L·d·l_seq (DeepSeek LLM); D = C/M", "complete": complete,
            "runs": rows, "fit": fit})
        return fit

    with warnings.catch_warnings():
        # dense MHA sweep models export as model_type 'deepseek'; the warning about hub code is noise here
        warnings.filterwarnings("ignore", message=".*model_type 'deepseek'.*")
        for i, run in enumerate(plan, 1):
            run_dir = out / "runs" / run.name
            cfg = run_config(run, settings, data_dir, vocab, n_val)
            spec = _spec(run, cfg, fp)
            head = (f"[{i}/{len(plan)}] C={run.budget:.3g} L={run.n_layer} d={run.d} M={run.M:.3g} "
                    f"D={run.tokens:.3g} ({run.steps} steps × {run.batch_size}×{settings.seq_len}, lr {run.lr:.3g})")
            if (run_dir / "run.json").is_file():
                old = _read_json(run_dir / "run.json")
                if old != json.loads(dumps(spec)):
                    raise ConfigError(
                        f"{run_dir} was started with different settings or data than this sweep; use another "
                        f"--out, or delete {run_dir} to retrain it")
            if (run_dir / "result.json").is_file():
                rows.append(result_row(_read_json(run_dir / "result.json")))
                cached += 1
                bpb = rows[-1].get("val_bpb")
                say(f"{head}: done before, " + (f"val_bpb {bpb:.4f}" if bpb is not None else "failed"))
                continue
            if run.tokens > n_train:
                notes.append(f"{run.name} sees its training data {run.tokens / n_train:.1f} times")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "run.json", spec)
            resume = latest_checkpoint(run_dir) is not None
            say(head + (" — resuming" if resume else ""))
            t0 = time.perf_counter()
            row = {"name": run.name, "run_dir": f"runs/{run.name}", **asdict(run), "C": run.C,
                   "moe": settings.moe, "seq_len": settings.seq_len}
            row.update(_param_counts(cfg.model, settings.seq_len))
            try:
                res = train_fn(cfg, run_dir, resume=resume, progress=progress)
            except KeyboardInterrupt:
                complete = False
                break
            except MoelabError as e:   # a diverged run: recorded, left out of the fit
                row.update(status="failed", error=str(e), val_bpb=None, seconds=time.perf_counter() - t0)
                write_json(run_dir / "result.json", row)
                rows.append(row)
                trained += 1
                say(f"    failed: {e}")
                continue
            if res.status != "finished":
                complete = False
                say(f"    interrupted at step {res.step}; run the same command again to resume")
                break
            ev = res.last_eval
            row.update(status="finished", val_bpb=float(ev["val_bpb"]), val_loss=float(ev["val_loss"]),
                       val_tokens=int(ev.get("val_tokens", 0)), seconds=time.perf_counter() - t0)
            write_json(run_dir / "result.json", row)
            if not keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            rows.append(row)
            trained += 1
            say(f"    val_bpb {row['val_bpb']:.4f} ({row['seconds']:.1f} s)")
            save()
    # rows of runs finished earlier but no longer in the plan (e.g. fewer --budgets) stay out of this fit
    fit = save()
    plot = plot_isoflop(rows, fit, out / "isoflop.png") if rows else None
    if fit.get("a") is not None:
        say(f"fit: M_opt = {fit['M_opt']['coef']:.4g}·C^{fit['a']:.4f}, D_opt = {fit['D_opt']['coef']:.4g}·"
            f"C^{fit['b']:.4f} over {fit['n_used']} budgets (DeepSeek LLM: a = 0.5243, b = 0.4757)")
    return SweepResult(out, rows, fit, complete, trained, cached, plot, notes)


def _param_counts(model_cfg, seq_len: int) -> dict:
    from moelab.scaling.laws import config_flops

    f = config_flops(model_cfg, seq_len=seq_len)
    return {"M_active": f.M_active, "total_params": f.total_params, "activated_params": f.activated_params,
            "embedding_params": f.embedding_params}


__all__ = ["FORMAT", "SweepResult", "collect_rows", "load_results", "refit", "result_row", "run_sweep"]
