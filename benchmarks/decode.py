"""Decoding throughput: moelab (MLA latent cache, absorbed attention) vs transformers ``generate``.

    python benchmarks/decode.py                                  # batch 1 and 8, contexts 512 and 4096
    python benchmarks/decode.py --batches 1 --contexts 512 --new 16

One Hugging Face checkpoint (the demo architecture with an 8K context, random weights) is loaded by
both. For each (batch, context) the prompt is prefilled (moelab: in chunks of ``--chunk``) and
``--new`` tokens are generated greedily; every generated token is timestamped (a transformers
streamer, moelab's ``on_token``), and decode tokens/s = batch·(new − 1) / (last − first token time),
so prefill is not counted. Median of ``--reps``, interleaved (ours, transformers, ours, ...). Prints
the cache bytes per token next to the MHA equivalent, and ends with one ``RESULT`` line.
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


class Clock:
    """Timestamps every generated token; works as a transformers streamer and as moelab's on_token."""

    def __init__(self, cuda: bool = False):
        self.times: list[float] = []
        self.prompt_seen = False
        self.cuda = cuda

    def _stamp(self):
        if self.cuda:                           # the token exists once the device is done with it
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def put(self, value):                       # transformers: the prompt first, then each new token
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self._stamp()

    def __call__(self, token):                  # moelab's on_token
        self._stamp()

    def end(self):
        pass

    def decode_seconds(self) -> float:
        """Time from the first generated token to the last: decode steps only, no prefill."""
        return self.times[-1] - self.times[0]


def decode_rates(runs, batch: int, new: int, reps: int, cuda: bool = False) -> list[float]:
    """Median decode tokens/s of each run; repetitions are interleaved (a, b, a, b, ...) so drift on a
    shared machine hits every run alike. The first round warms up."""
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(reps + 1):
        for i, run in enumerate(runs):
            clock = Clock(cuda)
            run(clock)
            rates[i].append(batch * (new - 1) / clock.decode_seconds())
    return [statistics.median(r[1:]) for r in rates]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: benchmarks/gpu.sh)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cfg = load_model_config(args.config)
    cfg = type(cfg)(**(cfg.model_dump() | {"max_position_embeddings": max(args.contexts) + args.new + 8}))
    with tempfile.TemporaryDirectory() as tmp:
        moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=0), tmp)
        ours = moelab.load(tmp, dtype=torch.float32).to(args.device).eval()
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(args.device).eval()
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
            ids = torch.randint(2, cfg.vocab_size, (B, ctx)).to(args.device)

            def ours_run(clock, n=args.new, ids=ids):
                return generate(ours, ids, n, greedy, eos_token_id=None, prefill_chunk=args.chunk, on_token=clock)

            def hf_run(clock, n=args.new, ids=ids):
                with torch.inference_mode():
                    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0, streamer=clock)

            same = torch.equal(ours_run(Clock(), 4), hf_run(Clock(), 4))
            ours_tps, hf_tps = decode_rates([ours_run, hf_run], B, args.new, args.reps, ids.is_cuda)
            print(f"| {B} | {ctx} | {ours_tps:,.1f} | {hf_tps:,.1f} | {ours_tps / hf_tps:.2f}x "
                  f"| {'yes' if same else 'no'} |", flush=True)
            summary[f"b{B}_ctx{ctx}_ratio"] = ours_tps / hf_tps
            summary[f"b{B}_ctx{ctx}_tok_s"] = ours_tps
    print("\nRESULT " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
