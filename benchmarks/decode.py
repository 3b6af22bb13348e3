"""Decoding throughput: moelab (MLA latent cache, absorbed attention) vs transformers ``generate``.

    python benchmarks/decode.py                                  # batch 1 and 8, contexts 512 and 4096
    python benchmarks/decode.py --batches 1 --contexts 512 --new 16

One Hugging Face checkpoint (the demo architecture with an 8K context, random weights) is loaded by
both. For each (batch, context) the prompt is prefilled (moelab: in chunks of ``--chunk``) and
``--new`` tokens are generated greedily; decode tokens/s = batch·(new − 1) / (time(new) − time(1)),
so prefill is not counted. Median of ``--reps``. Prints the cache bytes per token next to the MHA
equivalent, and ends with one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import moelab
from moelab.config import load_model_config
from moelab.infer import SamplingConfig, generate
from moelab.model.accounting import model_budget
from moelab.model.transformer import DeepSeekForCausalLM


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cfg = load_model_config(args.config)
    cfg = type(cfg)(**(cfg.model_dump() | {"max_position_embeddings": max(args.contexts) + args.new + 8}))
    with tempfile.TemporaryDirectory() as tmp:
        moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=0), tmp)
        ours = moelab.load(tmp, dtype=torch.float32).eval()
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    b = model_budget(cfg)
    print(f"cache per token: {b.cache_elems_per_token} values ({b.cache_bytes_per_token} B in bf16) — "
          f"MHA equivalent {b.mha_cache_elems_per_token} values ({b.mha_cache_bytes_per_token} B), "
          f"{b.mha_cache_elems_per_token / b.cache_elems_per_token:.1f}x larger\n")
    greedy = SamplingConfig(greedy=True)
    summary = {}
    print("| batch | context | moelab decode tok/s | transformers decode tok/s | ratio | same greedy tokens |")
    print("|---|---|---|---|---|---|")
    for B in args.batches:
        for ctx in args.contexts:
            ids = torch.randint(2, cfg.vocab_size, (B, ctx))

            def ours_run(n, ids=ids):
                return generate(ours, ids, n, greedy, eos_token_id=None, prefill_chunk=args.chunk)

            def hf_run(n, ids=ids):
                with torch.inference_mode():
                    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)

            same = torch.equal(ours_run(4), hf_run(4))
            t1, tn = timed(lambda: ours_run(1), args.reps), timed(lambda: ours_run(args.new), args.reps)
            h1, hn = timed(lambda: hf_run(1), args.reps), timed(lambda: hf_run(args.new), args.reps)
            ours_tps = B * (args.new - 1) / max(tn - t1, 1e-9)
            hf_tps = B * (args.new - 1) / max(hn - h1, 1e-9)
            print(f"| {B} | {ctx} | {ours_tps:,.1f} | {hf_tps:,.1f} | {ours_tps / hf_tps:.2f}x | {'yes' if same else 'no'} |",
                  flush=True)
            summary[f"b{B}_ctx{ctx}_ratio"] = ours_tps / hf_tps
            summary[f"b{B}_ctx{ctx}_tok_s"] = ours_tps
    print("\nRESULT " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
