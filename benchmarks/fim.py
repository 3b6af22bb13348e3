"""Fill-in-the-middle at 0.5 vs 0 on the same code and token budget: does FIM buy infilling at no
left-to-right cost (DeepSeek-Coder-V2 §2 / Coder v1; docs/methods.md §11)?

    python benchmarks/fim.py                          # 3 seeds × 2 arms, 400 steps each (~25 min on 2 cores)
    python benchmarks/fim.py --steps 200 --seeds 0
    python benchmarks/fim.py --eval-only              # evaluate the runs already in --out again

The corpus is this machine's Python standard library (`moelab data code stdlib`: filtered, deduplicated);
5% of its files (by a hash of their path) are held out for infilling. Both arms are prepared from the same
training files with the same tokenizer and the same train/val split; FIM 0.5 rearranges half of the
training documents PSM-style (`--fim-rate 0.5`), the validation split stays left-to-right in both. The
tiny config (configs/tiny.toml with a 4,096-token vocabulary) trains the same number of steps on both.

Reported per arm (mean ± spread over seeds): validation perplexity and bits/byte (left-to-right), single-line
infilling exact match on the held-out files (``--per-file`` lines each) and on HumanEval's 1,033 lines, and
the infilling NLL of those lines given the PSM prompt (the FIM loss: it moves before exact matches appear).
Prints a table and a closing ``RESULT`` line. The paper's direction: infilling gained, left-to-right kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

from moelab.data.code import build_code_corpus
from moelab.data.fim import FimSettings
from moelab.data.tokens import prepare
from moelab.train.config import load_run_config
from moelab.train.loop import train


def split_corpus(corpus: Path, out: Path, heldout_every: int = 20) -> tuple[Path, Path, int, int]:
    """train.jsonl / heldout.jsonl: a file is held out when the hash of its path is 0 modulo ``heldout_every``."""
    train_p, held_p = out / "train.jsonl", out / "heldout.jsonl"
    n_train = n_held = 0
    with corpus.open(encoding="utf-8") as f, train_p.open("w", encoding="utf-8") as tr, \
            held_p.open("w", encoding="utf-8") as he:
        for line in f:
            row = json.loads(line)
            h = int.from_bytes(hashlib.blake2b(row["path"].encode(), digest_size=4).digest(), "little")
            if h % heldout_every == 0:
                he.write(line)
                n_held += 1
            else:
                tr.write(line)
                n_train += 1
    return train_p, held_p, n_train, n_held


def fmt(xs: list[float], spec: str) -> str:
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{format(statistics.fmean(xs), spec)} ± {format(statistics.stdev(xs), spec)}"


def evaluate_infill(model_dir: Path, heldout: Path, per_file: int, humaneval_limit: int | None) -> dict:
    from moelab.evaluate.humaneval import load_problems
    from moelab.evaluate.infill import file_line_tasks, humaneval_line_tasks, infill_nll, run_infill
    from moelab.interop.hf_lm import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    held_tasks = file_line_tasks(heldout, per_file=per_file, seed=0)
    he_tasks = humaneval_line_tasks(load_problems(), humaneval_limit)
    files = run_infill(model, tok, held_tasks, batch_size=16)
    he = run_infill(model, tok, he_tasks, batch_size=16)
    return {"heldout_em": files["exact_match"], "heldout_n": files["n"], "humaneval_em": he["exact_match"],
            "humaneval_n": he["n"], "heldout_nll": infill_nll(model, tok, held_tasks, 16)["infill_nll"],
            "humaneval_nll": infill_nll(model, tok, he_tasks, 16)["infill_nll"]}


def _train(run: Path, data: Path, args, seed: int) -> dict:
    """Train one arm from scratch; returns its final evaluation record."""
    shutil.rmtree(run, ignore_errors=True)
    sets = [f"data.path={data}", f"data.seq_len={args.seq_len}", f"model.vocab_size={args.vocab_size}",
            f"train.steps={args.steps}", f"train.seed={seed}", f"train.eval_every={args.steps}",
            f"train.ckpt_every={args.steps}", "train.eval_batches=32", "train.keep_last=1",
            f"train.threads={args.threads}"]
    return train(load_run_config(args.config, sets), run, progress=False).last_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--per-file", type=int, default=4, help="infilling lines per held-out file")
    ap.add_argument("--humaneval-limit", type=int, default=None, help="only the first N HumanEval lines")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--out", default="runs/bench-fim")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the runs already in --out (no training)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = out / "stdlib.jsonl"
    if not corpus.is_file():
        report = build_code_corpus(["stdlib"], corpus, progress=False)
        print(f"code corpus: {report.n_kept} files kept, dropped {dict(report.dropped)}", flush=True)
    train_p, held_p, n_train, n_held = split_corpus(corpus, out)
    data = {"fim0": out / "data-fim0", "fim05": out / "data-fim05"}
    if not (data["fim0"] / "meta.json").is_file():
        prepare([train_p], data["fim0"], vocab_size=args.vocab_size, val_fraction=0.05, progress=False,
                overwrite=True)
    if not (data["fim05"] / "meta.json").is_file():
        prepare([train_p], data["fim05"], tokenizer=data["fim0"], val_fraction=0.05, progress=False,
                overwrite=True, fim=FimSettings(fim_rate=0.5, seed=0))
    fim_docs = json.loads((data["fim05"] / "meta.json").read_text())["fim"]["documents"]
    print(f"{n_train} training files, {n_held} held out; FIM 0.5 rearranged {fim_docs} training documents",
          flush=True)

    results: dict[str, dict[str, list[float]]] = {}
    for arm, rate in (("fim0", 0.0), ("fim05", 0.5)):
        for seed in args.seeds:
            run = out / f"{arm}-seed{seed}"
            t0 = time.perf_counter()
            if args.eval_only:
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                ev = next(r for r in reversed(rows) if "val_ppl" in r)
            else:
                ev = _train(run, data[arm], args, seed)
            inf = evaluate_infill(run / "model", held_p, args.per_file, args.humaneval_limit)
            r = results.setdefault(arm, {"ppl": [], "bpb": [], "heldout_em": [], "humaneval_em": [],
                                         "heldout_nll": [], "humaneval_nll": [], "minutes": []})
            for k in ("heldout_em", "humaneval_em", "heldout_nll", "humaneval_nll"):
                r[k].append(inf[k])
            r["ppl"].append(ev["val_ppl"])
            r["bpb"].append(ev["val_bpb"])
            r["minutes"].append((time.perf_counter() - t0) / 60)
            print(f"FIM {rate} seed {seed}: val ppl {ev['val_ppl']:.3f} ({ev['val_bpb']:.4f} bits/byte) · infilling "
                  f"EM held-out {inf['heldout_em']:.4f} (n={inf['heldout_n']}), HumanEval {inf['humaneval_em']:.4f} "
                  f"(n={inf['humaneval_n']}) · infill NLL held-out {inf['heldout_nll']:.3f}, HumanEval "
                  f"{inf['humaneval_nll']:.3f} nats/token · {r['minutes'][-1]:.1f} min", flush=True)

    cfg = load_run_config(args.config, [f"data.seq_len={args.seq_len}"])
    tokens = args.steps * cfg.train.batch_size * cfg.train.grad_accum * args.seq_len
    print(f"\n{args.config} (vocab {args.vocab_size}), {args.steps} steps per run, seeds {args.seeds}\n")
    print("| FIM rate | val perplexity (L2R) | bits/byte | infilling EM, held-out stdlib | infilling EM, HumanEval "
          "| infill NLL held-out (nats/token) | infill NLL HumanEval |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        print(f"| {0.5 if arm == 'fim05' else 0.0} | {fmt(r['ppl'], '.3f')} | {fmt(r['bpb'], '.4f')} "
              f"| {fmt(r['heldout_em'], '.4f')} | {fmt(r['humaneval_em'], '.4f')} | {fmt(r['heldout_nll'], '.3f')} "
              f"| {fmt(r['humaneval_nll'], '.3f')} |")
    m = {k: {q: statistics.fmean(v) for q, v in r.items()} for k, r in results.items()}
    a, b = m["fim0"], m["fim05"]
    print(f"\nRESULT fim0_ppl={a['ppl']:.4f} fim05_ppl={b['ppl']:.4f} ppl_ratio={b['ppl'] / a['ppl']:.4f} "
          f"fim0_heldout_em={a['heldout_em']:.4f} fim05_heldout_em={b['heldout_em']:.4f} "
          f"fim0_humaneval_em={a['humaneval_em']:.4f} fim05_humaneval_em={b['humaneval_em']:.4f} "
          f"fim0_heldout_nll={a['heldout_nll']:.4f} fim05_heldout_nll={b['heldout_nll']:.4f} "
          f"(~{tokens:,} tokens per run)")


if __name__ == "__main__":
    main()
