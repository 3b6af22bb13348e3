"""Loss-free balancing vs an auxiliary loss vs nothing, on the same tiny model, data and token budget.

    python benchmarks/balance.py                      # 600 steps per run, seed 0 (~11 min on 2 cores)
    python benchmarks/balance.py --steps 300 --seeds 0 1 2

Reproduces in miniature the comparison of Wang et al. 2024 (arXiv 2408.15664, Table 2; METHODS.md §3,
§13): the paper finds loss-free balancing reaches a far lower MaxVio_global than the auxiliary loss
(α = 1e-3) at equal or better perplexity. Prints one table (validation perplexity, MaxVio_global,
final MaxVio_batch per method, mean ± spread over seeds) and a closing ``RESULT`` line.
Needs the prepared corpus: ``moelab data prepare shakespeare --out runs/data/shakespeare --vocab-size 512``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from moelab.train.config import load_run_config
from moelab.train.loop import train

METHODS = {"loss_free": ["balance.method=loss_free", "balance.bias_update_rate=1e-3"],
           "aux_loss": ["balance.method=aux_loss", "balance.aux_alpha=1e-3"],
           "none": ["balance.method=none"]}


def final_maxvio_batch(run_dir: Path, last: int = 10) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r["maxvio_batch"] for r in rows if "maxvio_batch" in r]
    return statistics.fmean(vals[-last:])


def fmt(xs: list[float], spec: str) -> str:
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{format(statistics.fmean(xs), spec)} ± {format(statistics.stdev(xs), spec)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/bench-balance")
    args = ap.parse_args()

    results: dict[str, dict[str, list[float]]] = {}
    for method, sets in METHODS.items():
        for seed in args.seeds:
            run_dir = Path(args.out) / f"{method}-seed{seed}"
            overrides = [*sets, f"train.steps={args.steps}", f"train.seed={seed}", f"train.eval_every={args.steps}",
                         f"train.ckpt_every={args.steps}", "train.eval_batches=32", "train.keep_last=1"]
            cfg = load_run_config(args.config, overrides)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            t0 = time.perf_counter()
            res = train(cfg, run_dir, progress=False)
            ev = res.last_eval
            r = results.setdefault(method, {"ppl": [], "maxvio_global": [], "maxvio_batch": [], "minutes": []})
            r["ppl"].append(ev["val_ppl"])
            r["maxvio_global"].append(ev["maxvio_global"])
            r["maxvio_batch"].append(final_maxvio_batch(run_dir))
            r["minutes"].append((time.perf_counter() - t0) / 60)
            print(f"{method:>9} seed {seed}: ppl {ev['val_ppl']:.3f}  MaxVio_global {ev['maxvio_global']:.3f}  "
                  f"MaxVio_batch {r['maxvio_batch'][-1]:.3f}  ({r['minutes'][-1]:.1f} min)", flush=True)

    tokens = args.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    print(f"\n{args.config}, {args.steps} steps ({tokens:,} tokens) per run, seeds {args.seeds}\n")
    print("| method | val perplexity | MaxVio_global | final MaxVio_batch (last 10 logs) |")
    print("|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {fmt(r['ppl'], '.3f')} | {fmt(r['maxvio_global'], '.3f')} "
              f"| {fmt(r['maxvio_batch'], '.3f')} |")
    m = {k: (statistics.fmean(v["ppl"]), statistics.fmean(v["maxvio_global"]), statistics.fmean(v["maxvio_batch"]))
         for k, v in results.items()}
    lf, aux = m["loss_free"], m["aux_loss"]
    print("\nRESULT " + " ".join(f"{k}_ppl={v[0]:.4f} {k}_maxvio_global={v[1]:.4f} {k}_maxvio_batch={v[2]:.4f}"
                                 for k, v in m.items())
          + f" maxvio_global_ratio_aux_over_lossfree={aux[1] / lf[1]:.3f}"
            f" ppl_ratio_lossfree_over_aux={lf[0] / aux[0]:.4f}")


if __name__ == "__main__":
    main()
