"""Kernels per decode step: how many device ops one eager ``static`` decode step issues, per layer.

    python benchmarks/decode_ops.py                       # DeepSeek-V2-Lite's layers, batch 1 and 32
    python benchmarks/decode_ops.py --batches 1 --mode dynamic

At batch 1 a decode step reads a few GB of weights, which an H200 does in about a millisecond; each
kernel costs a few microseconds however little it does, even replayed from a CUDA graph (``graph``, the
default decode mode on CUDA). So the number of kernels a step launches bounds its speed as much as the
bytes it reads: 1,500 kernels at ~3 µs are 4.5 ms, i.e. ~220 tokens/s whatever the bandwidth. This
script counts them on the CPU, where they are the same ops: the top-level aten ops of a step (the
profiler's ops called from Python; views, reshapes and allocations excluded as they launch nothing;
casts counted where they copy), averaged over the steps of a short greedy generation.

The model is DeepSeek-V2-Lite (configs/deepseek-v2-lite.toml: 27 layers, MLA, 64 experts top-6 + 2
shared) with widths divided by ``--scale-down`` (op counts do not depend on widths), bf16, random
weights. Experts are grouped as on CUDA (no CPU row alignment). Batch 32 routes 192 rows to 64 experts,
so its MoE layers take the grouped (``fused``) kernel instead of batch 1's ``few_tokens`` gather.
Ends with one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from moelab.config import load_model_config
from moelab.infer.generate import generate
from moelab.model import experts
from moelab.model.transformer import DeepSeekForCausalLM

# ops that launch no kernel (views, shape queries, allocations) or only wrap the op that does
NO_KERNEL = {"aten::view", "aten::reshape", "aten::as_strided", "aten::slice", "aten::select", "aten::unsqueeze",
             "aten::squeeze", "aten::expand", "aten::t", "aten::transpose", "aten::permute", "aten::detach",
             "aten::alias", "aten::_unsafe_view", "aten::split", "aten::split_with_sizes", "aten::chunk",
             "aten::narrow", "aten::unbind", "aten::flatten", "aten::unflatten", "aten::empty", "aten::empty_like",
             "aten::empty_strided", "aten::new_empty", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
             "aten::contiguous", "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
             "aten::dropout", "aten::to"}


def build(scale_down: int, layers: int | None) -> DeepSeekForCausalLM:
    cfg = load_model_config("configs/deepseek-v2-lite.toml")
    d = scale_down
    update = dict(hidden_size=cfg.hidden_size // d, intermediate_size=cfg.intermediate_size // d,
                  moe_intermediate_size=cfg.moe_intermediate_size // d, vocab_size=4096, bos_token_id=0,
                  eos_token_id=1)
    if layers:
        update["num_hidden_layers"] = layers
    cfg = type(cfg)(**(cfg.model_dump() | update))
    return DeepSeekForCausalLM.from_config(cfg, seed=0).to(torch.bfloat16).eval()


def ops(model, ids: torch.Tensor, new: int, mode: str) -> collections.Counter:
    """Top-level ops of ``generate(model, ids, new)`` by name (casts that copy as ``cast``)."""
    with profile(activities=[ProfilerActivity.CPU]) as p:
        generate(model, ids, new, decode=mode)
    counts: collections.Counter = collections.Counter()
    for e in p.events():
        if e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"):
            continue                                   # inside another op: not a launch of its own here
        if e.name == "aten::to":
            if any(ch.name == "aten::_to_copy" for ch in e.cpu_children):
                counts["cast"] += 1
        elif e.name.startswith("aten::") and e.name not in NO_KERNEL:
            counts[e.name] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--mode", default="static", choices=["static", "dynamic"], help="decode mode (eager steps)")
    ap.add_argument("--scale-down", type=int, default=16, help="divide the widths (op counts do not change)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (default: all 27)")
    ap.add_argument("--top", type=int, default=12, help="list the most frequent ops")
    args = ap.parse_args()
    torch.manual_seed(0)
    experts.LOWP_CPU_ALIGN = 1                         # group experts as CUDA does
    model = build(args.scale_down, args.layers)
    L = model.config.num_hidden_layers
    result = []
    for B in args.batches:
        ids = torch.randint(2, 4096, (B, 16))
        generate(model, ids, 3, decode=args.mode)      # warm-up
        short, long = ops(model, ids, 2, args.mode), ops(model, ids, 10, args.mode)
        per_step = {k: (long[k] - short.get(k, 0)) / 8 for k in long if long[k] > short.get(k, 0)}
        total = sum(per_step.values())
        print(f"\n## batch {B}, {args.mode} decode, DeepSeek-V2-Lite layers ({L}): {total:,.0f} ops per step, "
              f"{total / L:.1f} per layer\n")
        print("| op | per step | per layer |\n|---|---|---|")
        for name, n in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"| {name.removeprefix('aten::')} | {n:,.0f} | {n / L:.1f} |")
        result.append(f"batch{B}_ops_per_step={total:.0f} batch{B}_ops_per_layer={total / L:.1f}")
    print("\nRESULT " + " ".join(result))


if __name__ == "__main__":
    main()
