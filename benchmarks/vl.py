"""Dynamic tiling vs a single view on a tiny DeepSeek-VL2-style model trained on generated tasks
(DeepSeek-VL2 §3.1; docs/methods.md §12): does tiling help on long and wide text images?

    python benchmarks/vl.py                               # 1 seed × 2 arms, 600 steps each (~20 min on 2 cores)
    python benchmarks/vl.py --seeds 0 1 2 --steps 600
    python benchmarks/vl.py --eval-only                   # score the runs already in --out again

Data (`moelab vl data`, generated once, the same for both arms): OCR of short strings on canvases from 8:1 to
1:6, chart QA on matplotlib bar charts (a value or the highest bar), grounding of coloured shapes with 20%
"not present" negatives; a disjoint-seed test split. Both arms train the tiny VL model of
configs/vl-tiny.toml (2-layer encoder of width 64 on 56-pixel tiles, here with 7-pixel patches: 4×4 image
tokens per tile) with the same steps, batch and seed, one SFT stage from scratch (chat template, loss on the
answers only). They differ only in the processor:

    tiling   max_tiles = 9: a global view plus up to 9 local tiles on the best canvas (the paper's rule)
    single   max_tiles = 1: the global view plus one tile of the same 56×56 canvas (no dynamic resolution)

Scored greedily on the test split: OCR exact match (all, and the extreme aspect ratios ≥ 4:1 or ≤ 1:4),
chart-QA exact match, grounding IoU@0.5 (negatives count as right when the answer says "not present") and
mean IoU. Prints a table and closing ``RESULT`` lines. The paper's direction: tiling wins on long and wide
text images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tokenizers import Tokenizer

from moelab.evaluate.vl_generate import vl_generate
from moelab.interop.vl_checkpoint import load_vl
from moelab.train.vl_config import load_vl_run_config
from moelab.train.vl_job import train_vl
from moelab.vision.processor import VLProcessor
from moelab.vision.synth import generate, grounding_iou, read_vl_jsonl
from moelab.vision.synth_options import SynthOptions

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vl-tiny.toml"
ARMS = {"tiling": 9, "single": 1}
EXTREME = {"8:1", "6:1", "4:1", "1:4", "1:6"}


def make_data(out: Path, n_train: int, n_test: int) -> Path:
    if (out / "train.jsonl").is_file() and (out / "test.jsonl").is_file():
        return out
    opts = SynthOptions(ocr_chars=(3, 6))
    generate(out, {"ocr": n_train // 2, "chart": n_train // 5, "shapes": n_train - n_train // 2 - n_train // 5},
             seed=0, split="train", options=opts, progress=True)
    generate(out, {"ocr": n_test // 2, "chart": n_test // 5, "shapes": n_test - n_test // 2 - n_test // 5},
             seed=1, split="test", options=opts, progress=True)
    return out


def run_arm(data: Path, run: Path, max_tiles: int, seed: int, steps: int) -> float:
    sets = ["vl.stage=sft", f"data.path={data / 'train.jsonl'}", f"train.steps={steps}", f"train.seed={seed}",
            "vision.patch_size=7", "processor.patch_size=7", f"processor.max_tiles={max_tiles}",
            "data.seq_len=512", "train.batch_size=8", "train.lr=2e-3", f"train.warmup_steps={max(steps // 20, 1)}",
            f"train.eval_every={max(steps // 4, 1)}", "train.eval_batches=4", f"train.ckpt_every={steps}"]
    cfg = load_vl_run_config(CONFIG, sets)
    t0 = time.perf_counter()
    if not (run / "model").is_dir():
        train_vl(cfg, run, progress=True)
    return time.perf_counter() - t0


def score(run: Path, data: Path, batch_size: int = 16) -> dict:
    model = load_vl(run / "model")
    proc = VLProcessor(Tokenizer.from_file(str(run / "model" / "tokenizer.json")), **model.processor_settings())
    recs = read_vl_jsonl(data / "test.jsonl")
    convs = [([m for m in r["messages"] if m["role"] != "assistant"], [data / r["image"]]) for r in recs]
    answers = vl_generate(model, proc, convs, max_new_tokens=48, batch_size=batch_size)
    out: dict[str, list[float]] = {"ocr": [], "ocr_extreme": [], "chart": [], "ground": [], "iou": []}
    for r, a in zip(recs, answers, strict=True):
        if r["task"] == "ocr":
            hit = float(a.strip() == r["answer"])
            out["ocr"].append(hit)
            if r["aspect"] in EXTREME:
                out["ocr_extreme"].append(hit)
        elif r["task"] == "chart":
            out["chart"].append(float(a.strip() == r["answer"]))
        elif r["task"] == "shapes":
            iou = grounding_iou(a, r)
            out["iou"].append(iou)
            out["ground"].append(float(iou >= 0.5))
    (run / "answers.jsonl").write_text("".join(json.dumps({"id": r["id"], "answer": a, "truth": r["answer"]}) + "\n"
                                               for r, a in zip(recs, answers, strict=True)))
    return {k: statistics.fmean(v) if v else float("nan") for k, v in out.items()} | {
        "n_" + k: len(v) for k, v in out.items()}


def fmt(xs: list[float]) -> str:
    return f"{xs[0]:.3f}" if len(xs) == 1 else f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-vl"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--train-examples", type=int, default=3000)
    ap.add_argument("--test-examples", type=int, default=300)
    ap.add_argument("--eval-only", action="store_true", help="Score the runs in --out without training.")
    args = ap.parse_args()
    data = make_data(args.out / "data", args.train_examples, args.test_examples)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm, tiles in ARMS.items():
            run = args.out / f"{arm}-seed{seed}"
            secs = 0.0 if args.eval_only else run_arm(data, run, tiles, seed, args.steps)
            res = score(run, data) | {"train_s": secs}
            (run / "scores.json").write_text(json.dumps(res, indent=2))
            print(f"{arm} seed {seed}: {json.dumps(res)}", flush=True)
            results[arm].append(res)
    n = results["tiling"][0]
    print(f"\n{len(args.seeds)} seed(s), {args.steps} steps, test: {n['n_ocr']} OCR ({n['n_ocr_extreme']} extreme), "
          f"{n['n_chart']} charts, {n['n_ground']} grounding\n")
    print("| arm | OCR EM | OCR EM, extreme aspect | chart-QA EM | grounding IoU@0.5 | mean IoU |")
    print("|---|---|---|---|---|---|")
    for arm, rs in results.items():
        cols = [fmt([r[k] for r in rs]) for k in ("ocr", "ocr_extreme", "chart", "ground", "iou")]
        print(f"| {arm} (max_tiles {ARMS[arm]}) | " + " | ".join(cols) + " |")
    t, s = results["tiling"], results["single"]
    mean = statistics.fmean
    print(f"\nRESULT ocr_extreme_tiling={mean(r['ocr_extreme'] for r in t):.4f} "
          f"ocr_extreme_single={mean(r['ocr_extreme'] for r in s):.4f} "
          f"ocr_tiling={mean(r['ocr'] for r in t):.4f} ocr_single={mean(r['ocr'] for r in s):.4f}")
    print(f"RESULT chart_tiling={mean(r['chart'] for r in t):.4f} chart_single={mean(r['chart'] for r in s):.4f} "
          f"ground_tiling={mean(r['ground'] for r in t):.4f} ground_single={mean(r['ground'] for r in s):.4f}")


if __name__ == "__main__":
    main()
