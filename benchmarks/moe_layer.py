"""One DeepSeekMoE layer, forward + backward: moelab's expert kernels vs transformers vs the dense limit.

    python benchmarks/moe_layer.py                                    # CPU shapes small + large, fp32 and bf16
    python benchmarks/moe_layer.py --shapes small --dtypes float32 --reps 7
    python benchmarks/moe_layer.py --device cuda --shapes v2lite --dtypes bfloat16 --autocast
    python benchmarks/moe_layer.py --shapes v3 --tokens 256 --scale-down 16 --reps 2   # CPU dry run

Shapes (E routed experts top-K + S shared, hidden H, expert width I, N tokens):

* ``small`` / ``large`` (CPU, issue "performance"): E 64, K 6, S 2, N 4,096, H/I 256/128 and 1024/256,
  V3-style sigmoid routing; peer transformers' ``DeepseekV3MoE``.
* ``v2lite`` (GPU, issue 14): DeepSeek-V2-Lite's layer, H 2048, I 1408, E 64 top-6 + 2 shared, N 16,384,
  softmax scores, ``topk_method`` greedy, one group, no renormalisation; peer ``DeepseekV2Moe``.
* ``v3`` (GPU, issue 14): DeepSeek-V3's layer, H 7168, I 2048, E 256 top-8 (8 groups, 4 kept, sigmoid,
  ``noaux_tc``) + 1 shared, N 8,192; peer ``DeepseekV3MoE``.

``--tokens`` and ``--scale-down D`` (H and I divided by D) make the GPU shapes small enough for a CPU
dry run (routing unchanged). The peer gets the *same* weight tensors (shared, not copied: V3's experts
are 11.3G parameters, 22.5 GB in bf16, as much again in gradients). The limit is a dense SwiGLU of the
active width (K + S)·I: the same active FLOPs with no routing and full-size GEMMs, a bound no MoE layer can beat.

FLOPs of one forward + backward (the router's are not counted)::

    F = 6 · N · (K + S) · 3 · H · I        (3 weight matrices, 2 FLOPs per MAC, backward = 2x forward)
    TFLOP/s = F / median time;   MFU = TFLOP/s / peak   (peak: 989 TFLOP/s, H100/H200 SXM dense bf16)

Precisions (``--dtypes``): ``float32`` / ``bfloat16`` weights and inputs, or ``autocast`` (also
``--autocast``): fp32 master weights and inputs under ``torch.autocast(bfloat16)``. Each variant is
warmed up, then timed as the median of ``--reps`` (CUDA events on a GPU), the repetitions interleaved
across variants. moelab variants are kernels (``expert_impl``); ``fused+compile`` also compiles the
fused kernel's activation math (``compile_experts``), ``fused+compile-layer`` runs the whole layer (router,
gating, permutation, experts, combine, shared experts) through ``torch.compile``, as ``train.compile``
does with whole blocks. "first calls s" is the first forward plus the first forward + backward (for the
compiled variants it holds the one-time compile). Activations = bytes of the distinct non-parameter
tensors autograd saves for backward. A variant that fails is listed with its error. Ends with
``TARGET`` lines (issue 14: >= 500 TFLOP/s, >= 1.6x transformers grouped_mm) and one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from moelab.config import make_config
from moelab.model.mlp import SwiGLU
from moelab.model.moe import DeepSeekMoE
from moelab.train.host_memory import keep_freed_host_memory

V3_ROUTER = dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True,
                 routed_scaling_factor=2.5)
ALL_IMPLS = ("loop", "grouped_mm", "padded_bmm", "fused", "fused+compile", "fused+compile-layer")
GPU_IMPLS = ("grouped_mm", "fused", "fused+compile", "fused+compile-layer")


@dataclass(frozen=True)
class Shape:
    hidden: int
    inner: int
    experts: int
    top_k: int
    shared: int
    tokens: int
    router: dict = field(default_factory=lambda: dict(V3_ROUTER))
    peer: str = "v3"                                  # transformers class: DeepseekV3MoE or DeepseekV2Moe
    impls: tuple[str, ...] = ALL_IMPLS                # moelab kernels run by default
    peers: tuple[str, ...] = ("grouped_mm", "eager")  # transformers experts implementations run by default

    def flops(self) -> float:
        """FLOPs of one forward + backward: 6 · N · (K + S) · 3 · H · I."""
        return 6.0 * self.tokens * (self.top_k + self.shared) * 3 * self.hidden * self.inner

    def formula(self) -> str:
        return (f"6 · N · (K + S) · 3 · H · I = 6 · {self.tokens} · ({self.top_k} + {self.shared}) · 3 · {self.hidden} "
                f"· {self.inner} = {self.flops():.3e} FLOP per forward + backward")


SHAPES = {
    "small": Shape(256, 128, 64, 6, 2, 4096),
    "large": Shape(1024, 256, 64, 6, 2, 4096),
    "v2lite": Shape(2048, 1408, 64, 6, 2, 16384, peer="v2", impls=GPU_IMPLS,
                    router=dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                                norm_topk_prob=False, routed_scaling_factor=1.0, scale_only_if_unnormalized=True)),
    "v3": Shape(7168, 2048, 256, 8, 1, 8192, impls=GPU_IMPLS, peers=("grouped_mm",),
                router=dict(V3_ROUTER, n_group=8, topk_group=4)),
}
PEAK_TFLOPS = 989.0   # H100/H200 SXM, dense bf16 (no sparsity)
TARGET_TFLOPS, TARGET_SPEEDUP = 500.0, 1.6    # issue 14, for the GPU shapes:
GPU_TARGETS = ("v2lite", "v3")
ERRORS = (Exception,)   # a path this device or dtype lacks, out of memory, a compile failure: listed, not fatal


def scaled(shape: Shape, scale_down: int, tokens: int | None) -> Shape:
    """H and I divided by ``scale_down`` (multiples of 8, so bf16 rows stay 16-byte aligned), N = ``tokens``."""
    def div(n: int) -> int:
        return max(8, n // scale_down // 8 * 8)
    if scale_down > 1:
        shape = replace(shape, hidden=div(shape.hidden), inner=div(shape.inner))
    return replace(shape, tokens=tokens) if tokens else shape


def _on_device(make, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build a module on the meta device, cast it (moelab's router keeps fp32), allocate it on ``device``
    and draw every parameter from N(0, 0.02), buffers zero: one copy of the weights, never on the host."""
    with torch.device("meta"):
        m = make()
    m = m.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
        for b in m.buffers():
            b.zero_()
    return m


def moelab_layer(s: Shape, device: str, dtype: torch.dtype) -> DeepSeekMoE:
    cfg = make_config(dict(vocab_size=8, hidden_size=s.hidden, num_hidden_layers=1, num_attention_heads=1,
                           kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=None,
                           n_routed_experts=s.experts, num_experts_per_tok=s.top_k, n_shared_experts=s.shared,
                           moe_intermediate_size=s.inner, **s.router))
    return _on_device(lambda: DeepSeekMoE(cfg, 0), device, dtype)


def hf_layer(s: Shape, ours: DeepSeekMoE, impl: str) -> torch.nn.Module:
    """transformers' MoE layer holding ``ours``'s parameter and buffer objects (no copy, one gradient)."""
    if s.peer == "v2":
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Layer

        cfg = DeepseekV2Config(hidden_size=s.hidden, moe_intermediate_size=s.inner, n_routed_experts=s.experts,
                               num_experts_per_tok=s.top_k, n_shared_experts=s.shared, topk_method="greedy",
                               n_group=1, topk_group=1, routed_scaling_factor=s.router["routed_scaling_factor"],
                               num_hidden_layers=1, num_attention_heads=1)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Layer

        cfg = DeepseekV3Config(hidden_size=s.hidden, moe_intermediate_size=s.inner, n_routed_experts=s.experts,
                               num_experts_per_tok=s.top_k, n_shared_experts=s.shared, n_group=s.router["n_group"],
                               topk_group=s.router["topk_group"], norm_topk_prob=True,
                               routed_scaling_factor=s.router["routed_scaling_factor"], num_hidden_layers=1,
                               num_attention_heads=1)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        hf = Layer(cfg)
    theirs = dict(hf.named_parameters()) | dict(hf.named_buffers())
    mine = dict(ours.named_parameters()) | dict(ours.named_buffers())
    assert set(theirs) == set(mine), (sorted(set(theirs) ^ set(mine)))
    for name, t in mine.items():
        path, _, attr = name.rpartition(".")
        owner = hf.get_submodule(path)
        if isinstance(t, torch.nn.Parameter):
            setattr(owner, attr, t)
        else:
            owner.register_buffer(attr, t)
    return hf


class Variant:
    """One column of the table: a module, and for moelab the kernel it is switched to before each call
    (all moelab variants share one layer and its weights)."""

    def __init__(self, module: torch.nn.Module, impl: str | None = None):
        self.module, self.impl = module, impl

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl is not None:
            kernel, _, compiled = self.impl.partition("+")
            self.module.experts.impl = kernel
            self.module.experts.compile = compiled == "compile"
        return self.module(x)


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


class Bench:
    """Times forward + backward of variants on one input; all parameters' gradients are dropped before
    each call, so one set of gradients exists at a time."""

    def __init__(self, x: torch.Tensor, grad: torch.Tensor, params: list, autocast: bool):
        self.x, self.grad, self.params = x, grad, params
        self.cuda = x.is_cuda
        self.ctx = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if autocast else nullcontext

    def forward(self, v: Variant) -> torch.Tensor:
        with self.ctx():
            return v(self.x)

    def fwd_bwd(self, v: Variant) -> float:
        self.x.grad = None
        for p in self.params:
            p.grad = None
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = self.forward(v)
        out.backward(self.grad.to(out.dtype))
        if self.cuda:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - t0


def _num(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def run(s: Shape, dt: str, reps: int, device: str, impls, peers) -> tuple[dict[str, dict], dict[str, str]]:
    """Results per variant (ms, act_mb, max_diff, first_s) and the errors of the variants that failed."""
    autocast = dt == "autocast"
    dtype = torch.float32 if autocast else getattr(torch, dt)
    torch.manual_seed(0)
    base = moelab_layer(s, device, dtype)
    variants: dict[str, Variant] = {"dense SwiGLU (limit)": Variant(_on_device(
        lambda: SwiGLU(s.hidden, (s.top_k + s.shared) * s.inner), device, dtype))}
    for impl in impls:   # "+compile-layer": the whole layer (router, gating, experts, combine) torch.compile'd
        variants[f"moelab {impl}"] = Variant(torch.compile(base) if impl.endswith("+compile-layer") else base, impl)
    errors: dict[str, str] = {}
    for impl in peers:
        try:
            variants[f"transformers {impl}"] = Variant(hf_layer(s, base, impl))
        except ERRORS as e:
            errors[f"transformers {impl}"] = _one_line(e)
    params = list({id(p): p for v in variants.values() for p in v.module.parameters()}.values())
    x = torch.randn(1, s.tokens, s.hidden, dtype=dtype, device=device, requires_grad=True)
    bench = Bench(x, torch.randn(1, s.tokens, s.hidden, dtype=dtype, device=device), params, autocast)
    results: dict[str, dict] = {}
    ref = None
    for name, v in list(variants.items()):
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = bench.forward(v)
            if x.is_cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            mem = saved_activation_bytes(lambda v=v: bench.forward(v), v.module.parameters())
            first += bench.fwd_bwd(v)
            bench.fwd_bwd(v)
        except ERRORS as e:
            errors[name] = _one_line(e)
            del variants[name]
            continue
        diff = float("nan")
        if name.startswith(("moelab", "transformers")):
            ref = out if ref is None else ref
            diff = float((out.float() - ref.float()).abs().max())
        results[name] = {"act_mb": mem / 2**20, "max_diff": diff, "first_s": first}
        del out
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):                         # interleaved: drift hits every variant alike
        for name, v in list(variants.items()):
            try:
                times[name].append(bench.fwd_bwd(v))
            except ERRORS as e:
                errors[name] = _one_line(e)
                del variants[name], results[name]
    for name in variants:
        results[name]["ms"] = statistics.median(times[name]) * 1e3 if times[name] else float("nan")
    return results, errors


def report(shape_name: str, s: Shape, dt: str, res: dict, errors: dict, peak: float | None, where: str,
           reps: int, scale_down: int) -> dict[str, object]:
    """Print one table (and its TARGET line); return its RESULT entries."""
    summary: dict[str, object] = {}
    peer = next((n for n in ("transformers grouped_mm", "transformers eager") if n in res), None)
    dense = res.get("dense SwiGLU (limit)", {"ms": float("nan"), "act_mb": float("nan")})
    hf = res[peer] if peer else {"ms": float("nan")}
    what = "fp32 master weights, bf16 autocast" if dt == "autocast" else dt
    note = f" (scaled down {scale_down}x)" if scale_down > 1 else ""
    print(f"\n## {shape_name}{note}: hidden {s.hidden}, expert width {s.inner}, {s.experts} experts "
          f"top-{s.top_k} + {s.shared} shared, {s.tokens} tokens, {what}, {where}, median of {reps}\n")
    print(f"FLOPs: {s.formula()}; TFLOP/s = FLOPs / time"
          + (f"; MFU = TFLOP/s / {peak:.0f}" if peak else "") + "\n")
    print(f"| implementation | fwd+bwd ms | TFLOP/s | MFU | time vs dense limit | speed-up vs {peer} | "
          "activations MiB | vs dense | max |out diff| vs first MoE | first calls s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        tf = s.flops() / (r["ms"] / 1e3) / 1e12
        r["tflops"] = tf
        mfu = f"{100 * tf / peak:.1f}%" if peak else "n/a"
        print(f"| {name} | {r['ms']:.2f} | {_num(tf)} | {mfu} | {r['ms'] / dense['ms']:.2f}x | "
              f"{hf['ms'] / r['ms']:.2f}x | {r['act_mb']:.1f} | {r['act_mb'] / dense['act_mb']:.2f}x | "
              f"{r['max_diff']:.1e} | {r['first_s']:.1f} |")
    for name, err in errors.items():
        print(f"| {name} | failed: {err.replace('|', '/')} | | | | | | | | |")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    key = f"{shape_name}_{dt}"
    ours = [n for n in res if n.startswith("moelab")]
    if not ours:
        return {f"{key}_best": "none"}
    best = min(ours, key=lambda n: res[n]["ms"])
    b = res[best]
    summary[f"{key}_best"] = best.split()[1]
    if peer != "transformers grouped_mm":      # the speed-up below is then against this peer
        summary[f"{key}_peer"] = str(peer).replace(" ", "_")
    summary[f"{key}_tflops"] = b["tflops"]
    if peak:
        summary[f"{key}_mfu"] = b["tflops"] / peak
    summary[f"{key}_dense_tflops"] = dense.get("tflops", float("nan"))
    summary[f"{key}_hf_tflops"] = hf.get("tflops", float("nan"))
    summary[f"{key}_vs_dense"] = b["ms"] / dense["ms"]
    summary[f"{key}_speedup_vs_hf"] = hf["ms"] / b["ms"]
    summary[f"{key}_mem_vs_dense"] = b["act_mb"] / dense["act_mb"]
    speedup = hf["ms"] / b["ms"]
    if shape_name in GPU_TARGETS:
        print(f"\nTARGET {key}{note}: moelab {best.split()[1]} {_num(b['tflops'])} TFLOP/s "
              f"(>= {TARGET_TFLOPS:.0f}: {'met' if b['tflops'] >= TARGET_TFLOPS else 'not met'}), "
              f"{speedup:.2f}x {peer} (>= {TARGET_SPEEDUP}x: "
              f"{'met' if speedup >= TARGET_SPEEDUP else 'not met'})")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["small", "large"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "autocast"])
    ap.add_argument("--autocast", action="store_true",
                    help="also run each shape with fp32 master weights under torch.autocast(bfloat16)")
    ap.add_argument("--tokens", type=int, default=None, help="override the shape's token count")
    ap.add_argument("--scale-down", type=int, default=1, help="divide hidden size and expert width (CPU dry runs)")
    ap.add_argument("--impls", nargs="+", choices=ALL_IMPLS, help="moelab kernels (default: per shape)")
    ap.add_argument("--peers", nargs="+", choices=["grouped_mm", "eager", "batched_mm"],
                    help="transformers experts implementations (default: per shape)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: benchmarks/gpu.sh)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"peak for MFU (default on CUDA: {PEAK_TFLOPS:.0f}, H100/H200 SXM dense bf16; none on CPU)")
    ap.add_argument("--host-memory", choices=["keep", "release"], default="keep",
                    help="keep: glibc reuses freed blocks, as moelab's trainer sets (process-wide, so the peer "
                         "gets it too); release: glibc's default, big blocks page-fault afresh every step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.host_memory == "keep":
        keep_freed_host_memory()
    dtypes = list(dict.fromkeys(args.dtypes + (["autocast"] if args.autocast else [])))
    peak = args.peak_tflops or (PEAK_TFLOPS if args.device.startswith("cuda") else None)
    where = f"{args.threads} threads" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    summary: dict[str, object] = {}
    for shape_name in args.shapes:
        s = scaled(SHAPES[shape_name], args.scale_down, args.tokens)
        for dt in dtypes:
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                res, errors = run(s, dt, args.reps, args.device, args.impls or s.impls, args.peers or s.peers)
            except ERRORS as e:     # building the layer itself failed (out of memory?): the next case may not
                print(f"\n## {shape_name} {dt}: failed: {_one_line(e)}")
                continue
            summary |= report(shape_name, s, dt, res, errors, peak, where, args.reps, args.scale_down)
    print("\nRESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
