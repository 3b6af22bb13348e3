"""One DeepSeekMoE layer, forward + backward: moelab's expert kernels vs transformers vs the dense limit.

    python benchmarks/moe_layer.py                    # both shapes, fp32 and bf16
    python benchmarks/moe_layer.py --shapes small --dtypes float32 --reps 7

Shapes (issue "performance"): 64 routed experts top-6 + 2 shared, 4,096 tokens, hidden/expert width
256/128 ("small") and 1024/256 ("large"). The peer is transformers' ``DeepseekV3MoE`` with the same
weights (default ``grouped_mm`` experts path, and ``eager``); the limit is a dense SwiGLU with the same
active FLOPs (width (6+2)·I). Each variant is warmed up, then timed as the median of ``--reps`` runs,
the repetitions interleaved across variants. "first calls s" is the first forward plus the first
forward + backward of each variant: for ``fused+compile`` it holds the one-time compile (the compiled
functions are shared across shapes, so later tables show recompiles, if any).
Memory is the activation memory kept for backward (bytes of the distinct non-parameter tensors saved by
autograd), which is what differs between kernels. Ends with one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moelab.config import make_config
from moelab.model.mlp import SwiGLU
from moelab.model.moe import DeepSeekMoE
from moelab.train.host_memory import keep_freed_host_memory

SHAPES = {"small": (256, 128), "large": (1024, 256)}
E, K, SHARED, TOKENS = 64, 6, 2, 4096
IMPLS = ("loop", "grouped_mm", "padded_bmm", "fused", "fused+compile")


def moelab_layer(H: int, I: int, impl: str) -> DeepSeekMoE:
    cfg = make_config(dict(vocab_size=8, hidden_size=H, num_hidden_layers=1, num_attention_heads=1,
                           kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=None,
                           n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=SHARED, moe_intermediate_size=I,
                           scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                           norm_topk_prob=True, routed_scaling_factor=2.5, expert_impl=impl.split("+")[0],
                           compile_experts=impl.endswith("+compile")))
    return DeepSeekMoE(cfg, 0)


def hf_layer(ours: DeepSeekMoE, H: int, I: int, impl: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                           n_shared_experts=SHARED, n_group=1, topk_group=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, num_hidden_layers=1, num_attention_heads=1)
    cfg._experts_implementation = impl
    hf = DeepseekV3MoE(cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def saved_activation_bytes(fn, params) -> int:
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def fwd_bwd(module, x, grad) -> float:
    x.grad = None
    module.zero_grad(set_to_none=True)
    _sync(x)
    t0 = time.perf_counter()
    module(x).backward(grad)
    _sync(x)
    return time.perf_counter() - t0


def time_round_robin(variants: dict, x, grad, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median fwd+bwd time per variant, and each variant's first (warm-up) fwd+bwd time; repetitions
    interleave the variants, so machine noise (other load, frequency changes) hits all of them alike
    instead of whichever ran at a bad moment."""
    first = {}
    for name, mod in list(variants.items()):
        try:
            first[name] = fwd_bwd(mod, x, grad)
        except (RuntimeError, NotImplementedError, ValueError, AttributeError) as e:   # a path this device lacks
            print(f"skipped {name}: {str(e).splitlines()[0][:200]}", flush=True)
            del variants[name]
            continue
        fwd_bwd(mod, x, grad)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, mod in variants.items():
            times[name].append(fwd_bwd(mod, x, grad))
    return {name: statistics.median(t) for name, t in times.items()}, first


def run(shape: str, dtype: torch.dtype, reps: int, device: str = "cpu") -> dict[str, dict]:
    H, I = SHAPES[shape]
    torch.manual_seed(0)
    base = moelab_layer(H, I, "loop")
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    variants: dict[str, torch.nn.Module] = {"dense SwiGLU (limit)": SwiGLU(H, (K + SHARED) * I)}
    for impl in IMPLS:
        m = moelab_layer(H, I, impl)
        m.load_state_dict(base.state_dict())
        variants[f"moelab {impl}"] = m
    for impl in ("grouped_mm", "eager"):
        variants[f"transformers {impl}"] = hf_layer(base, H, I, impl)
    x = torch.randn(1, TOKENS, H, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(1, TOKENS, H, dtype=dtype, device=device)
    results = {}
    ref = None
    for name, mod in list(variants.items()):
        mod = variants[name] = mod.to(device, dtype)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = mod(x)
            _sync(x)
            first_fwd = time.perf_counter() - t0
            mem = saved_activation_bytes(lambda m=mod: m(x), list(mod.parameters()))
        except (RuntimeError, NotImplementedError, ValueError, AttributeError) as e:   # a path this device lacks
            print(f"skipped {name}: {str(e).splitlines()[0][:200]}", flush=True)
            del variants[name]
            continue
        if name.startswith(("moelab", "transformers")):
            ref = out if ref is None else ref
            diff = float((out.float() - ref.float()).abs().max())
        else:
            diff = float("nan")
        results[name] = {"act_mb": mem / 2**20, "max_diff": diff, "first_s": first_fwd}
    medians, first = time_round_robin(variants, x, grad, reps)
    results = {name: r for name, r in results.items() if name in medians}
    for name, t in medians.items():
        results[name]["ms"] = t * 1e3
        results[name]["first_s"] += first[name]   # first forward + first fwd+bwd: includes any compiling
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: benchmarks/gpu.sh)")
    ap.add_argument("--host-memory", choices=["keep", "release"], default="keep",
                    help="keep: glibc reuses freed blocks, as moelab's trainer sets (process-wide, so the peer "
                         "gets it too); release: glibc's default, big blocks page-fault afresh every step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.host_memory == "keep":
        keep_freed_host_memory()
    summary = {}
    for shape in args.shapes:
        for dt in args.dtypes:
            res = run(shape, getattr(torch, dt), args.reps, args.device)
            peer = next((n for n in ("transformers grouped_mm", "transformers eager") if n in res), None)
            dense, hf = res["dense SwiGLU (limit)"], res[peer] if peer else {"ms": float("nan")}
            H, I = SHAPES[shape]
            where = f"{args.threads} threads" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
            print(f"\n## {shape}: hidden {H}, expert width {I}, {E} experts top-{K} + {SHARED} shared, "
                  f"{TOKENS} tokens, {dt}, {where}, median of {args.reps}\n")
            print(f"| implementation | fwd+bwd ms | vs dense | speed-up vs {peer} | "
                  "activations MiB | vs dense | max |out diff| vs first MoE | first calls s |")
            print("|---|---|---|---|---|---|---|---|")
            for name, r in res.items():
                print(f"| {name} | {r['ms']:.1f} | {r['ms'] / dense['ms']:.2f}x | {hf['ms'] / r['ms']:.2f}x | "
                      f"{r['act_mb']:.1f} | {r['act_mb'] / dense['act_mb']:.2f}x | {r['max_diff']:.1e} | "
                      f"{r['first_s']:.1f} |")
            best = min((n for n in res if n.startswith("moelab")), key=lambda n: res[n]["ms"])
            key = f"{shape}_{dt}"
            summary[f"{key}_best"] = best.split()[1]
            if peer != "transformers grouped_mm":      # the speed-up below is then against this peer
                summary[f"{key}_peer"] = str(peer).replace(" ", "_")
            summary[f"{key}_vs_dense"] = res[best]["ms"] / dense["ms"]
            summary[f"{key}_speedup_vs_hf"] = hf["ms"] / res[best]["ms"]
            summary[f"{key}_mem_vs_dense"] = res[best]["act_mb"] / dense["act_mb"]
    print("\nRESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
