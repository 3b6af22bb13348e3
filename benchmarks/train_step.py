"""Whole-model training step (forward + backward + AdamW): moelab vs transformers on the same checkpoint.

    python benchmarks/train_step.py                          # demo config and a ~100M-parameter one
    python benchmarks/train_step.py --configs tiny --dtypes float32 --reps 5

Both models are loaded from one Hugging Face checkpoint written by moelab (random weights), so they
compute the same function. A step is batch × seq_len tokens through forward, cross-entropy, backward
and ``torch.optim.AdamW(fused=True).step`` (what moelab's trainer and transformers' Trainer default
to); fp32, or bf16 autocast with fp32 weights. Median of ``--reps`` steps after ``--warmup`` untimed
ones, the two models' steps interleaved. Ends with one ``RESULT`` line (tokens/s and the
moelab/transformers ratio).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import moelab
from moelab.config import load_model_config
from moelab.model.transformer import DeepSeekForCausalLM

CONFIGS = {
    "tiny": ("configs/tiny.toml", {}),
    # ~100M total parameters: 8 layers, hidden 512, 32 experts of width 256 (top-4) + 1 shared; attention
    # back to the library default "auto" (tiny.toml picks "absorb", which only pays at its d_c = qk_nope;
    # here d_c = 2·qk_nope and absorbed training attention costs ~1.8x the FLOPs: measured 7% slower step)
    "100m": ("configs/tiny.toml", dict(attn_impl="auto", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                       num_attention_heads=8, n_routed_experts=32, num_experts_per_tok=4,
                                       moe_intermediate_size=256, n_group=4, topk_group=2, q_lora_rank=256,
                                       kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)),
}


def make_step(model, ids, dtype: str):
    """One training step of ``model`` (forward, cross-entropy, backward, AdamW) as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x, y = ids[:, :-1], ids[:, 1:]
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else nullcontext

    def once():
        with ctx():
            logits = model(x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return once


def step_times(steps: list, reps: int, warmup: int) -> list[float]:
    """Median seconds per step of each closure; steps are interleaved (a, b, a, b, ...) after the
    warm-up, so drift on a shared machine hits every model alike."""
    for once in steps:
        for _ in range(warmup):
            once()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(reps):
        for i, once in enumerate(steps):
            t0 = time.perf_counter()
            once()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per model first (kernel caches fill)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile-experts", action="store_true",
                    help="torch.compile the expert activation math (compile time is spent in the warm-up steps)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    summary = {}
    print("| config | params | dtype | moelab tokens/s | transformers tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        path, overrides = CONFIGS[name]
        cfg = load_model_config(path).model_copy(update=overrides | {"compile_experts": args.compile_experts})
        cfg = type(cfg)(**cfg.model_dump())
        with tempfile.TemporaryDirectory() as tmp:
            moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=0), tmp)
            ours = moelab.load(tmp, dtype=torch.float32).train()
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
        n_params = sum(p.numel() for p in ours.parameters())
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
        tokens = args.batch * args.seq_len
        for dt in args.dtypes:
            t_ours, t_hf = step_times([make_step(ours, ids, dt), make_step(hf, ids, dt)], args.reps, args.warmup)
            ratio = t_hf / t_ours
            print(f"| {name} | {n_params / 1e6:.1f}M | {dt} | {tokens / t_ours:,.0f} | {tokens / t_hf:,.0f} | "
                  f"{ratio:.2f}x |", flush=True)
            summary[f"{name}_{dt}_tok_s"] = tokens / t_ours
            summary[f"{name}_{dt}_hf_tok_s"] = tokens / t_hf
            summary[f"{name}_{dt}_ratio"] = ratio
    print("\nRESULT " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
