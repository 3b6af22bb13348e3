"""The alignment fidelity experiment: GRPO and on-policy DPO from the SFT arithmetic model, equal sample budgets.

    python benchmarks/align.py                                    # 3 seeds, full size (see --help for sizes)
    python benchmarks/align.py --out runs/bench-align-quick --demo runs/bench-align-quick/demo/model \
        --pretrain-steps 600 --sft-steps 600 --test-size 200      # the quick size
    python benchmarks/align.py --seeds 0 --steps 20 ...           # one seed, fewer steps

Start: the SFT model of the fine-tuning benchmark (benchmarks/finetune.py): the demo model (configs/tiny.toml,
Shakespeare; trained here first when --demo is missing, ``--pretrain-steps`` shortens it) fully fine-tuned on
two-term arithmetic from reasoning-gym (``moelab data tasks arithmetic``), written to OUT/sft/model unless
``--sft`` names one. Test set: prompts disjoint from the training prompts, exact match from greedy decoding.
Validation set: prompts disjoint from both. Where ``--grpo-lr`` / ``--dpo-lr`` list several learning rates, each
is tried on the first seed and the one with the best *validation* exact match is kept for every seed (the test
set never chooses anything); the sweep is printed.

Equal budgets: each method draws S = steps × prompts-per-step × group samples from the model it starts from.

* GRPO: ``moelab finetune grpo`` for ``--steps`` steps of ``prompts-per-step`` prompts × ``group`` samples
  (exact-match reward; μ = 1).
* DPO: ``moelab data prefs``'s rule on as many prompts × ``group`` samples of the SFT model (one pair per
  prompt with a right and a wrong answer), then ``moelab finetune dpo`` for ``--dpo-epochs`` over the pairs.

Reported (mean ± std over seeds): exact match before → after, Shakespeare validation perplexity before →
after (forgetting), samples/s (the budget over the whole wall time, sampling included) and the training
loop's tokens/s. Prints a markdown table and ``RESULT`` lines; writes OUT/results.json and OUT/table.md.
The issue's expected direction: both raise exact match over SFT, GRPO more per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import moelab  # noqa: E402
from moelab.data.tasks import generate, write_jsonl  # noqa: E402
from moelab.data.tokenizer import load_tokenizer  # noqa: E402
from moelab.evaluate.exact_match import score_exact_match  # noqa: E402
from moelab.tune.config import load_finetune_config  # noqa: E402
from moelab.tune.preferences import build_preferences  # noqa: E402
from moelab.tune.run import finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "runs/data/shakespeare"
EVAL_WINDOWS = 128          # Shakespeare validation windows per perplexity (batch size × eval batches)


def ensure_demo(demo: Path, steps: int | None) -> None:
    """The Shakespeare demo model of `make demo` (configs/tiny.toml), trained here when missing."""
    if (demo / "config.json").is_file():
        return
    from moelab.data.tokens import prepare
    from moelab.train.config import load_run_config
    from moelab.train.loop import train

    print(f"{demo} missing: training the demo model ({steps or 'all'} steps of configs/tiny.toml)", file=sys.stderr)
    if not (GENERAL / "meta.json").is_file():
        prepare("shakespeare", GENERAL, vocab_size=512, progress=False)
    sets = [f"data.path={GENERAL}"] + ([f"train.steps={steps}", f"train.ckpt_every={steps}",
                                         f"train.eval_every={steps}"] if steps else [])
    train(load_run_config(ROOT / "configs/tiny.toml", sets), demo.parent, progress=False)


def ensure_sft(args, task_train: Path) -> Path:
    """The SFT arithmetic model: full fine-tuning as in benchmarks/finetune.py (LR 1e-3)."""
    if args.sft is not None:
        return args.sft
    out = args.out / "sft"
    if (out / "model" / "config.json").is_file():
        return out / "model"
    ensure_demo(args.demo, args.pretrain_steps)
    sets = [f"finetune.base={args.demo}", f"data.path={task_train}", "data.seq_len=128", "data.val_fraction=0.05",
            f"train.steps={args.sft_steps}", "train.batch_size=16", "train.lr=1e-3", "train.weight_decay=0.0",
            f"train.eval_every={args.sft_steps}", f"train.ckpt_every={args.sft_steps}", "train.log_every=25"]
    print(f"SFT: full fine-tuning of {args.demo} for {args.sft_steps} steps", file=sys.stderr)
    finetune(load_finetune_config(None, sets, method="full"), out, progress=False)
    return out / "model"


def common_sets(args, base: Path, seed: int, steps: int) -> list[str]:
    return [f"finetune.base={base}", f"data.general_path={GENERAL}", f"data.seq_len={args.seq_len}",
            f"train.steps={steps}", f"train.seed={seed}", f"train.eval_every={steps}",
            f"train.ckpt_every={steps}", "train.log_every=1", "train.weight_decay=0.0", "train.dtype=float32"]


def logs_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def outcome(run: Path, res, tok, test: list[dict], t0: float, budget: int, args) -> dict:
    """Exact match on the test set (``em``) and on the validation set (``em_val``), forgetting and speed."""
    rows = logs_of(run)
    first = next(r for r in rows if "general_val_ppl" in r)
    wall = time.perf_counter() - t0
    model = moelab.load(run / "model", dtype=torch.float32)
    em = score_exact_match(model, tok, test, max_new_tokens=args.max_new)["accuracy"]
    em_val = score_exact_match(model, tok, args.val_rows, max_new_tokens=args.max_new)["accuracy"]
    steps = [r for r in rows if "tokens_per_s" in r]
    return {"em": em, "em_val": em_val, "ppl_before": first["general_val_ppl"],
            "ppl_after": res.last_eval["general_val_ppl"],
            "wall_s": wall, "samples_per_s": budget / wall,
            "train_tokens_per_s": statistics.mean(r["tokens_per_s"] for r in steps[1:] or steps), "samples": budget}


def run_grpo(args, base: Path, seed: int, lr: float, task_train: Path, tok, test) -> dict:
    rows = args.prompts_per_step * args.group
    sets = common_sets(args, base, seed, args.steps) + [
        f"data.path={task_train}", "data.val_fraction=0.02", f"train.batch_size={rows}", f"train.lr={lr}",
        f"train.eval_batches={max(1, EVAL_WINDOWS // rows)}",
        f"grpo.group={args.group}", f"grpo.max_new_tokens={args.max_new}", f"grpo.beta={args.grpo_beta}",
        "grpo.reward=exact_match", "grpo.temperature=1.0"]
    run = args.out / f"grpo-s{seed}-lr{lr:g}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    res, summary = finetune(load_finetune_config(None, sets, method="grpo"), run, progress=False)
    out = outcome(run, res, tok, test, t0, args.steps * rows, args)
    train_rewards = [r["reward_mean"] for r in logs_of(run) if "reward_mean" in r]
    out.update(reward_first=statistics.mean(train_rewards[:5]), reward_last=statistics.mean(train_rewards[-5:]),
               reward_errors=summary["rewards"]["reward_errors"])
    return out


def run_dpo(args, base: Path, seed: int, lr: float, train_rows: list[dict], tok, test) -> dict:
    n_prompts = args.steps * args.prompts_per_step
    rng = torch.Generator().manual_seed(seed)
    prompts = [train_rows[int(i)] for i in torch.randperm(len(train_rows), generator=rng)[:n_prompts]]
    t0 = time.perf_counter()
    model = moelab.load(base, dtype=torch.float32)
    pairs, stats = build_preferences(model, tok, prompts, samples=args.group, temperature=1.0,
                                     max_new_tokens=args.max_new, batch_size=args.prompts_per_step * 2, seed=seed)
    del model
    run = args.out / f"dpo-s{seed}-lr{lr:g}"
    shutil.rmtree(run, ignore_errors=True)
    if len(pairs) < 4:
        print(f"DPO seed {seed}: only {len(pairs)} pairs from {n_prompts} prompts; skipped", file=sys.stderr)
        return {"pairs": len(pairs), "skipped": True}
    prefs = write_jsonl(pairs, args.out / f"prefs-s{seed}.jsonl")
    steps = max(1, round(args.dpo_epochs * len(pairs) * 0.9 / args.dpo_batch))
    sets = common_sets(args, base, seed, steps) + [
        f"data.path={prefs}", "data.val_fraction=0.1", f"train.batch_size={args.dpo_batch}",
        f"train.eval_batches={max(1, EVAL_WINDOWS // args.dpo_batch)}",
        f"train.lr={lr}", f"dpo.beta={args.dpo_beta}"]
    res, _ = finetune(load_finetune_config(None, sets, method="dpo"), run, progress=False)
    out = outcome(run, res, tok, test, t0, n_prompts * args.group, args)
    out.update(pairs=len(pairs), dpo_steps=steps, sample_accuracy=stats.correct_samples / max(stats.samples, 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-align")
    ap.add_argument("--sft", type=Path, default=None, help="the SFT model (default: OUT/sft/model, made if missing)")
    ap.add_argument("--demo", type=Path, default=ROOT / "runs/demo/model", help="the Shakespeare demo model")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="shorten the demo pre-training (if it runs)")
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT steps (as benchmarks/finetune.py)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo"])
    ap.add_argument("--steps", type=int, default=60, help="GRPO steps; the sample budget is steps × P × G")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group", type=int, default=8, help="G: samples per prompt (both methods)")
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--grpo-lr", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4],
                    help="learning rate; several: chosen on the validation set with the first seed")
    ap.add_argument("--grpo-beta", type=float, default=0.04)
    ap.add_argument("--dpo-lr", type=float, nargs="+", default=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4],
                    help="learning rate; several: chosen on the validation set with the first seed")
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--dpo-batch", type=int, default=8)
    ap.add_argument("--dpo-epochs", type=float, default=2.0)
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--val-size", type=int, default=200, help="validation prompts (choose the learning rate)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train_rows = generate("arithmetic", args.train_size, seed=0)
    test = generate("arithmetic", args.test_size, seed=1, exclude={r["prompt"] for r in train_rows})
    args.val_rows = generate("arithmetic", args.val_size, seed=2,
                             exclude={r["prompt"] for r in train_rows} | {r["prompt"] for r in test})
    task_train = write_jsonl(train_rows, args.out / "train.jsonl")
    base = ensure_sft(args, task_train)
    tok = load_tokenizer(base)
    sft_model = moelab.load(base, dtype=torch.float32)
    sft_em = score_exact_match(sft_model, tok, test, max_new_tokens=args.max_new)["accuracy"]
    sft_em_val = score_exact_match(sft_model, tok, args.val_rows, max_new_tokens=args.max_new)["accuracy"]
    print(f"SFT model {base}: test exact match {sft_em:.3f}, validation {sft_em_val:.3f}", file=sys.stderr)
    results: dict[str, list[dict]] = {"grpo": [], "dpo": []}
    runners = {"grpo": lambda s, lr: run_grpo(args, base, s, lr, task_train, tok, test),
               "dpo": lambda s, lr: run_dpo(args, base, s, lr, train_rows, tok, test)}
    lrs = {"grpo": args.grpo_lr, "dpo": args.dpo_lr}
    chosen, sweeps = {}, {}
    for name in args.methods:     # the learning rate: best validation exact match on the first seed
        sweeps[name] = {lr: runners[name](args.seeds[0], lr) for lr in lrs[name]}
        done = {lr: r for lr, r in sweeps[name].items() if not r.get("skipped")}
        chosen[name] = max(done, key=lambda lr: done[lr]["em_val"]) if done else lrs[name][0]
        if len(lrs[name]) > 1:
            print(f"{name} learning rate by validation EM: " + ", ".join(
                f"{lr:g}: {r['em_val']:.3f}" for lr, r in done.items()) + f" → {chosen[name]:g}", file=sys.stderr)
    for seed in args.seeds:
        for name in args.methods:
            lr = chosen[name]
            r = sweeps[name][lr] if seed == args.seeds[0] else runners[name](seed, lr)
            results[name].append({"seed": seed, "lr": lr, **r})
            if not r.get("skipped"):
                print(f"  {name} seed {seed} lr {lr:g}: EM {sft_em:.3f} → {r['em']:.3f}, ppl {r['ppl_before']:.2f} → "
                      f"{r['ppl_after']:.2f}, {r['wall_s']:.0f} s", file=sys.stderr)

    def agg(name, key):
        vals = [r[key] for r in results[name] if not r.get("skipped")]
        if not vals:
            return float("nan"), 0.0
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    budget = args.steps * args.prompts_per_step * args.group
    lines = [f"SFT model: test exact match {sft_em:.3f} ({args.test_size} prompts disjoint from training); budget "
             f"{budget} samples per method ({args.steps} × {args.prompts_per_step} prompts × G = {args.group}); "
             f"seeds {args.seeds}", "",
             "| method | exact match (SFT → after) | Δ EM per 1k samples | Shakespeare ppl before → after | "
             "samples/s | train tokens/s | wall s |", "|---|---|---|---|---|---|---|"]
    kv = [f"sft_em={sft_em:.3f}", f"budget={budget}"]
    for name in args.methods:
        em, sd = agg(name, "em")
        b, _ = agg(name, "ppl_before")
        a, a_sd = agg(name, "ppl_after")
        sps, _ = agg(name, "samples_per_s")
        tps, _ = agg(name, "train_tokens_per_s")
        wall, _ = agg(name, "wall_s")
        lines.append(f"| {name} | {sft_em:.3f} → {em:.3f} ± {sd:.3f} | {1000 * (em - sft_em) / budget:+.3f} | "
                     f"{b:.2f} → {a:.2f} ± {a_sd:.2f} | {sps:.1f} | {tps:,.0f} | {wall:.0f} |")
        kv += [f"{name}_lr={chosen[name]:g}", f"{name}_em={em:.3f}", f"{name}_em_std={sd:.3f}", f"{name}_ppl={a:.2f}",
               f"{name}_samples_per_s={sps:.1f}"]
    for name in args.methods:
        if len(lrs[name]) > 1:
            lines.append("")
            lines.append(f"{name} learning rate chosen on {args.val_size} validation prompts (seed {args.seeds[0]}; "
                         f"SFT {sft_em_val:.3f}): "
                         + ", ".join(f"{lr:g} → {r['em_val']:.3f}" + (" (kept)" if lr == chosen[name] else "")
                                     for lr, r in sweeps[name].items() if not r.get("skipped")))
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps({"sft_em": sft_em, "sft_em_val": sft_em_val,
                               "args": {k: str(v) for k, v in vars(args).items() if k != "val_rows"},
                               "runs": results, "chosen_lr": chosen,
                               "sweeps": {n: {f"{lr:g}": r for lr, r in sw.items()} for n, sw in sweeps.items()},
                               "total_s": time.perf_counter() - t_start}, indent=2))
    tmp.replace(args.out / "results.json")
    print("RESULT " + " ".join(kv))


if __name__ == "__main__":
    main()
