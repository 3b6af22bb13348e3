"""Whole-model training step (forward + backward + AdamW): moelab vs transformers on the same checkpoint.

    python benchmarks/train_step.py                          # demo config and a ~100M-parameter one
    python benchmarks/train_step.py --configs tiny --dtypes float32 --reps 5

Both models are loaded from one Hugging Face checkpoint written by moelab (random weights), so they
compute the same function. A step is batch × seq_len tokens through forward, cross-entropy, backward
and ``torch.optim.AdamW(fused=True).step`` (what moelab's trainer and transformers' Trainer default
to); fp32, or bf16 autocast with fp32 weights. Median of ``--reps`` steps after ``--warmup`` untimed
ones, the models' steps interleaved. Each model runs in its own process, so ``--host-memory`` can
give each the allocator setting its library ships with (the default) or all the same one. A third
model, the *dense limit* (:func:`dense_limit`: every MoE layer a dense SwiGLU of the active width),
bounds what any MoE implementation can reach: the ratio bound column is transformers' step time over
its. Ends with one ``RESULT`` line (tokens/s, the moelab/transformers ratio and the bound).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import moelab
from moelab.config import ModelConfig, load_model_config
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.train.compile import compile_dense_parts
from moelab.train.host_memory import keep_freed_host_memory

CONFIGS = {
    "tiny": ("configs/tiny.toml", {}),
    # ~100M total parameters: 8 layers, hidden 512, 32 experts of width 256 (top-4) + 1 shared; attention
    # back to the library default "auto" (tiny.toml picks "absorb", which only pays at its d_c = qk_nope;
    # here d_c = 2·qk_nope and absorbed training attention costs ~1.8x the FLOPs: measured 7% slower step)
    "100m": ("configs/tiny.toml", dict(attn_impl="auto", vocab_size=8192, hidden_size=512, intermediate_size=1536,
                                       num_hidden_layers=8, num_attention_heads=8, n_routed_experts=32,
                                       num_experts_per_tok=4, moe_intermediate_size=256, n_group=4, topk_group=2,
                                       q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                       v_head_dim=64)),
}


def dense_limit(cfg):
    """The same model with every MoE layer replaced by a dense SwiGLU of the MoE layers' active width
    ``(top-k + shared)·moe_intermediate_size`` (the dense first layers take that width too): a bound no
    MoE implementation can beat, since it does the active FLOPs with no routing and full-size GEMMs."""
    width = (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size
    return cfg.model_copy(update=dict(first_k_dense_replace=cfg.num_hidden_layers, intermediate_size=width))


def make_step(model, ids, dtype: str):
    """One training step of ``model`` (forward, cross-entropy, backward, AdamW) as a closure; on CUDA
    it waits for the device, so wall-clock timing is right."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x, y = ids[:, :-1], ids[:, 1:]
    kind = ids.device.type
    ctx = (lambda: torch.autocast(kind, dtype=torch.bfloat16)) if dtype == "bfloat16" else nullcontext

    def once():
        with ctx():
            logits = model(x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "cuda":
            torch.cuda.synchronize()

    return once


def _worker(conn, kind: str, source: str, cfg_json: str, ids: torch.Tensor, threads: int, keep: bool,
            device: str = "cpu", compile_dense: bool = False) -> None:
    """One model in its own process (so each gets its own allocator setting): builds it, then runs
    ``(dtype, n)`` requests — n steps, their seconds sent back — until it receives None."""
    torch.set_num_threads(threads)
    if keep:
        keep_freed_host_memory()
    if kind == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    elif kind == "moelab":
        model = moelab.load(source, dtype=torch.float32)
    else:  # the dense limit, freshly initialised (its speed does not depend on the weights)
        model = DeepSeekForCausalLM.from_config(ModelConfig.model_validate_json(cfg_json), seed=0)
    model.to(device).train()
    if compile_dense and kind != "transformers":
        compile_dense_parts(model)
    ids = ids.to(device)
    conn.send(sum(p.numel() for p in model.parameters()))
    steps = {}
    while (req := conn.recv()) is not None:
        dt, n = req
        once = steps.setdefault(dt, make_step(model, ids, dt))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        conn.send(times)


def step_times(conns: list, dtype: str, reps: int, warmup: int) -> list[float]:
    """Median seconds per step of each worker; one step at a time, interleaved (a, b, c, a, b, c, ...)
    after the warm-up, so drift on a shared machine hits every model alike and no two ever overlap."""
    for c in conns:
        c.send((dtype, warmup))
        c.recv()
    times: list[list[float]] = [[] for _ in conns]
    for _ in range(reps):
        for i, c in enumerate(conns):
            c.send((dtype, 1))
            times[i] += c.recv()
    return [statistics.median(t) for t in times]


# which processes keep freed host memory (moelab.train.host_memory), per --host-memory
KEEP = {"shipped": {"moelab": True, "transformers": False, "dense": True},
        "keep": {"moelab": True, "transformers": True, "dense": True},
        "release": {"moelab": False, "transformers": False, "dense": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per model first (kernel caches fill)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: benchmarks/gpu.sh)")
    ap.add_argument("--host-memory", choices=list(KEEP), default="shipped",
                    help="shipped: each library as its users run it — moelab's trainer keeps freed host memory "
                         "for reuse (moelab.train.host_memory), a transformers process has glibc's default; "
                         "keep / release: the same setting for all (equal footing)")
    ap.add_argument("--compile", action="store_true",
                    help="moelab (and its dense limit) with train.compile: torch.compile of the blocks' dense "
                         "parts; the compile happens in the warm-up steps")
    ap.add_argument("--compile-experts", action="store_true",
                    help="torch.compile the expert activation math (compile time is spent in the warm-up steps)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")

    summary = {}
    print(f"host memory: {args.host_memory} "
          f"({', '.join(f'{k} ' + ('keeps' if v else 'releases') for k, v in KEEP[args.host_memory].items())})\n")
    print("| config | params | dtype | moelab tokens/s | transformers tokens/s | ratio | dense-limit tokens/s "
          "| ratio bound (dense limit vs transformers) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        path, overrides = CONFIGS[name]
        cfg = load_model_config(path).model_copy(update=overrides | {"compile_experts": args.compile_experts})
        cfg = type(cfg)(**cfg.model_dump())
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
        tokens = args.batch * args.seq_len
        with tempfile.TemporaryDirectory() as tmp:
            moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=0), tmp)
            conns, procs = [], []
            for kind in ("moelab", "transformers", "dense"):
                here, there = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(there, kind, tmp, dense_limit(cfg).model_dump_json(), ids,
                                                      args.threads, KEEP[args.host_memory][kind], args.device,
                                                      args.compile),
                                daemon=True)
                p.start()
                there.close()   # the child holds its end: if it dies, recv() here raises EOFError, no hang
                conns.append(here)
                procs.append(p)
            try:
                n_params = [c.recv() for c in conns][0]
                for dt in args.dtypes:
                    t_ours, t_hf, t_dense = step_times(conns, dt, args.reps, args.warmup)
                    ratio = t_hf / t_ours
                    print(f"| {name} | {n_params / 1e6:.1f}M | {dt} | {tokens / t_ours:,.0f} | {tokens / t_hf:,.0f} | "
                          f"{ratio:.2f}x | {tokens / t_dense:,.0f} | {t_hf / t_dense:.2f}x |", flush=True)
                    summary[f"{name}_{dt}_tok_s"] = tokens / t_ours
                    summary[f"{name}_{dt}_hf_tok_s"] = tokens / t_hf
                    summary[f"{name}_{dt}_ratio"] = ratio
                    summary[f"{name}_{dt}_bound"] = t_hf / t_dense
            finally:
                for c, p in zip(conns, procs, strict=True):
                    try:
                        c.send(None)
                    except OSError:          # that worker is gone already (its error is on stderr)
                        pass
                    p.join(timeout=60)
                    if p.is_alive():
                        p.kill()
    print("\nRESULT " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
