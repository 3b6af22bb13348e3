"""Whole-model training step (forward + backward + AdamW): moelab vs transformers with the same weights.

    python benchmarks/train_step.py                          # demo config and a ~100M-parameter one (CPU)
    python benchmarks/train_step.py --configs tiny --modes float32 --reps 5
    python benchmarks/train_step.py --device cuda --configs v2lite-4l --modes autocast bf16
    python benchmarks/train_step.py --configs v2lite-4l --scale-down 16 --batch 1 --seq-len 64   # CPU dry run

Presets: ``tiny`` (configs/tiny.toml), ``100m`` (~100M parameters) and ``v2lite-4l`` (issue 14): DeepSeek-V2-Lite
(configs/deepseek-v2-lite.toml: vocab 102,400, hidden 2048, 16 heads, MLA with kv_lora_rank 512 and no query
compression, qk_nope/rope/v 128/64/128, softmax greedy routing) cut to 4 layers: one dense (width 10,944), then 3 MoE
layers of 64 experts (width 1408) top-6 + 2 shared; batch 4 × 2,048 tokens. ``--scale-down D`` divides its widths and
vocabulary by D (CPU dry runs).

Every model is built directly on ``--device`` from ``seed=0``; the transformers peer
(``AutoModelForCausalLM.from_config`` of the config.json moelab writes: DeepseekV2/V3ForCausalLM, its default
``grouped_mm`` experts, ``sdpa`` attention) is loaded with that model's state dict, so both compute the same function
(the first-step losses are printed side by side). A step is batch × seq_len tokens through forward, cross-entropy
(fp32 logits), backward and ``torch.optim.AdamW(fused=True)``. Modes (``--modes``): ``float32``; ``autocast`` = bf16
autocast with fp32 master weights (issue 14, mode a); ``bf16`` = bf16 weights, no autocast (mode b). Each model runs
in its own process (its own allocator settings, ``--host-memory``); median of ``--reps`` steps after ``--warmup``
untimed ones. On the CPU the models' steps interleave one at a time; on a GPU (or ``--turns``) the models take turns,
each alone on the device. A third model, the *dense limit* (:func:`dense_limit`: every MoE layer a dense SwiGLU of the
active width) bounds what any MoE implementation can reach. A model that fails in a mode gets its error in the table,
and the run goes on.

Model FLOPs utilisation (training; the same for both libraries, whatever their kernels compute)::

    FLOPs/token = 6 · N_active + 3 · L · n_heads · (d_qk + d_v) · T
    MFU         = tokens/s · FLOPs/token / peak      (peak 989e12: H100/H200 SXM dense bf16)

N_active = parameters a token multiplies with: all but the input embedding (a lookup) and the routed experts, plus K/E
of the routed experts (the LM head counts). The attention term is causal: each query sees (T + 1)/2 ≈ T/2 keys, QKᵀ
(d_qk = qk_nope + qk_rope) and PV (d_v) at 2 FLOPs per multiply-add, ×3 for forward + backward. Counting attention as
non-causal (6 · L · n_heads · (d_qk + d_v) · T, as the issue's baseline MFU figures did) gives a higher figure; the
table prints the factor. Ends with ``TARGET`` lines (issue 14: MFU >= 40% in autocast, >= 1.5x transformers in bf16)
and one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from moelab.config import ModelConfig, load_model_config
from moelab.model.accounting import model_budget
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.train.compile import compile_model
from moelab.train.host_memory import keep_freed_host_memory

CONFIGS = {   # name: (TOML, overrides, default batch, default seq_len)
    "tiny": ("configs/tiny.toml", {}, 8, 256),
    # ~100M parameters: 8 layers, hidden 512, 32 experts of width 256 top-4 + 1 shared; attention "auto", not
    # tiny.toml's "absorb" (at d_c = 2·qk_nope absorbed training attention costs ~1.8x: a 7% slower step)
    "100m": ("configs/tiny.toml", dict(attn_impl="auto", vocab_size=8192, hidden_size=512, intermediate_size=1536,
                                       num_hidden_layers=8, num_attention_heads=8, n_routed_experts=32,
                                       num_experts_per_tok=4, moe_intermediate_size=256, n_group=4, topk_group=2,
                                       q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                       v_head_dim=64), 8, 256),
    # issue 14: DeepSeek-V2-Lite with 4 layers (1 dense + 3 MoE), batch 4 x 2048
    "v2lite-4l": ("configs/deepseek-v2-lite.toml", dict(num_hidden_layers=4), 4, 2048),
}
MODES = ("float32", "autocast", "bf16")
PEAK = 989e12            # H100/H200 SXM, dense bf16 FLOP/s (no sparsity)
TARGET_MFU, TARGET_RATIO = 0.40, 1.5
KINDS = ("moelab", "transformers", "dense")
NOT_RUN = "not run (--kinds)"


def scale_down(cfg: ModelConfig, d: int) -> ModelConfig:
    """The same architecture with widths, heads and vocabulary divided by ``d`` (layers, experts and
    routing unchanged): a CPU dry run of a GPU preset."""
    def div(n: int, step: int = 8) -> int:
        return max(step, n // d // step * step)
    return cfg.model_copy(update=dict(
        vocab_size=div(cfg.vocab_size), hidden_size=div(cfg.hidden_size), intermediate_size=div(cfg.intermediate_size),
        moe_intermediate_size=div(cfg.moe_intermediate_size), num_attention_heads=max(1, cfg.num_attention_heads // d),
        kv_lora_rank=div(cfg.kv_lora_rank), qk_nope_head_dim=div(cfg.qk_nope_head_dim),
        qk_rope_head_dim=div(cfg.qk_rope_head_dim, 2), v_head_dim=div(cfg.v_head_dim),
        q_lora_rank=cfg.q_lora_rank and div(cfg.q_lora_rank), bos_token_id=0, eos_token_id=1))


def dense_limit(cfg):
    """Every MoE layer (and dense first layer) a dense SwiGLU of width ``(top-k + shared)·moe_intermediate_size``:
    a bound no MoE implementation beats — the active FLOPs with no routing and full-size GEMMs."""
    width = (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size
    return cfg.model_copy(update=dict(first_k_dense_replace=cfg.num_hidden_layers, intermediate_size=width))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[float, float, str]:
    """(training FLOPs per token with causal attention, with non-causal attention, the formula in numbers)."""
    b = model_budget(cfg, seq_len=seq_len)
    n_active = b.activated_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    d_qk, d_v = ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim) if cfg.use_mla
                 else (cfg.attn_head_dim, cfg.attn_head_dim))
    L, h = cfg.num_hidden_layers, cfg.num_attention_heads
    attn = 3 * L * h * (d_qk + d_v) * seq_len
    text = (f"6 · N_active + 3 · L · n_heads · (d_qk + d_v) · T = 6 · {n_active / 1e6:.2f}M + 3 · {L} · {h} · "
            f"({d_qk} + {d_v}) · {seq_len} = {(6 * n_active + attn) / 1e9:.3f} GFLOP")
    return 6 * n_active + attn, 6 * n_active + 2 * attn, text


def build(kind: str, cfg: ModelConfig, device: str):
    """moelab's model (seed 0), its dense limit, or transformers' model holding moelab's seed-0 weights."""
    if kind == "dense":
        return DeepSeekForCausalLM.from_config(dense_limit(cfg), seed=0, device=device)
    ours = DeepSeekForCausalLM.from_config(cfg, seed=0, device=device)
    if kind == "moelab":
        return ours
    from transformers import AutoConfig, AutoModelForCausalLM

    from moelab.interop.hf_config import config_to_hf

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_to_hf(cfg)))
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf


def make_step(model, ids, mode: str, kwargs: dict):
    """A training step (forward, cross-entropy, backward, AdamW) as a closure returning the loss (synchronised)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x, y = ids[:, :-1], ids[:, 1:]
    kind = ids.device.type
    ctx = (lambda: torch.autocast(kind, dtype=torch.bfloat16)) if mode == "autocast" else nullcontext

    def once():
        with ctx():
            logits = model(x, **kwargs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    return once


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200].replace("|", "/")


def _worker(conn, kind: str, cfg_json: str, ids: torch.Tensor, threads: int, keep: bool,
            device: str = "cpu", compile_how: bool | str = False) -> None:
    """One model in its own process: builds it (sends its parameter count, or an error), then runs
    ``(mode, n)`` requests — n steps, sending ``("ok", seconds, first loss)`` or ``("error", message)``
    — until it receives None. A mode change casts the weights (bf16 or fp32) and drops the optimizer."""
    torch.set_num_threads(threads)
    if keep:
        keep_freed_host_memory()
    try:
        model = build(kind, ModelConfig.model_validate_json(cfg_json), device).train()
        if compile_how and kind != "transformers":
            compile_model(model, compile_how)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()    # the transformers worker's moelab copy: give it back to the others
        conn.send(("ok", sum(p.numel() for p in model.parameters())))
    except Exception as e:   # noqa: BLE001 (reported in the table; the other models go on)
        conn.send(("error", _one_line(e)))
        return
    ids = ids.to(device)
    kwargs = {"use_cache": False} if kind == "transformers" else {}
    current, once = None, None
    while (req := conn.recv()) is not None:
        mode, n = req
        try:
            if mode != current:
                once = current = None
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                model.to(torch.bfloat16 if mode == "bf16" else torch.float32)
                once, current = make_step(model, ids, mode, kwargs), mode
            times, loss = [], None
            for _ in range(n):
                t0 = time.perf_counter()
                out = once()
                times.append(time.perf_counter() - t0)
                loss = float(out) if loss is None else loss
            conn.send(("ok", times, loss))
        except Exception as e:   # noqa: BLE001 (a failing mode is one line in the table)
            once = current = None
            model.zero_grad(set_to_none=True)
            conn.send(("error", _one_line(e)))


def step_times(conns: dict, mode: str, reps: int, warmup: int) -> dict[str, tuple[float, float] | str]:
    """Per worker: (median seconds per step, loss of its first warm-up step), or its error. Steps run
    one at a time, interleaved (a, b, c, a, b, c, ...) after the warm-up, so drift on a shared machine
    hits every model alike and no two ever overlap."""
    out: dict[str, tuple[float, float] | str] = {}
    live = {}
    for kind, c in conns.items():
        reply = _ask(c, (mode, max(1, warmup)))
        if reply[0] == "ok":
            live[kind] = (c, reply[2])
        else:
            out[kind] = reply[1]
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(reps):
        for kind, (c, _loss) in list(live.items()):
            reply = _ask(c, (mode, 1))
            if reply[0] == "ok":
                times[kind] += reply[1]
            else:
                out[kind] = reply[1]
                del live[kind]
    for kind, (_c, loss) in live.items():
        out[kind] = (statistics.median(times[kind]) if times[kind] else float("nan"), loss)
    return out


def _ask(conn, req):
    try:
        conn.send(req)
        return conn.recv()
    except (EOFError, OSError, BrokenPipeError):
        return ("error", "worker process died (see stderr)")


# which processes keep freed host memory (moelab.train.host_memory), per --host-memory
KEEP = {"shipped": {"moelab": True, "transformers": False, "dense": True},
        "keep": {"moelab": True, "transformers": True, "dense": True},
        "release": {"moelab": False, "transformers": False, "dense": False}}


def _x(v: float) -> str:
    return "–" if v != v else f"{v:.2f}x"


def report(name: str, mode: str, res: dict, n_params: float, tokens: int, fpt: float, peak: float | None
           ) -> tuple[dict[str, float], list[str]]:
    """Print one table row (a mode's results per model: (seconds, first loss) or an error) and return
    its RESULT entries and TARGET lines."""
    ok = {k: not isinstance(res[k], str) for k in KINDS}
    tps = {k: tokens / res[k][0] if ok[k] else float("nan") for k in KINDS}
    mfu = {k: tps[k] * fpt / peak if peak else float("nan") for k in KINDS}

    def cells(k: str) -> str:
        if not ok[k]:
            return f"{'' if res[k] == NOT_RUN else 'failed: '}{res[k]} | –"
        return f"{tps[k]:,.0f} | " + (f"{100 * mfu[k]:.1f}%" if peak else "n/a")

    ratio, bound = tps["moelab"] / tps["transformers"], tps["dense"] / tps["transformers"]
    dense = f"{tps['dense']:,.0f}" if ok["dense"] else cells("dense").split(" | ")[0]
    losses = " / ".join(f"{res[k][1]:.4f}" if ok[k] else "–" for k in KINDS[:2])
    print(f"| {name} | {n_params / 1e6:.1f}M | {mode} | {cells('moelab')} | {cells('transformers')} | {_x(ratio)} | "
          f"{dense} | {_x(bound)} | {losses} |", flush=True)
    key = f"{name}_{mode}".replace("/", "_by")
    summary = {f"{key}_tok_s": tps["moelab"], f"{key}_hf_tok_s": tps["transformers"], f"{key}_ratio": ratio,
               f"{key}_bound": bound}
    targets = []
    issue = name.startswith("v2lite-4l")      # the targets of issue 14 are for this preset
    if peak:
        summary |= {f"{key}_mfu": mfu["moelab"], f"{key}_hf_mfu": mfu["transformers"]}
        if mode == "autocast" and issue:
            met = "met" if mfu["moelab"] >= TARGET_MFU else "not met"
            targets.append(f"TARGET {name} autocast: moelab MFU {100 * mfu['moelab']:.1f}% "
                           f"(>= {100 * TARGET_MFU:.0f}%: {met})")
    if mode == "bf16" and issue and ok["transformers"]:
        met = "met" if ratio >= TARGET_RATIO else "not met"
        targets.append(f"TARGET {name} bf16: moelab {_x(ratio)} transformers tokens/s (>= {TARGET_RATIO}x: {met})")
    return summary, targets


def start_workers(kinds: list[str], cfg: ModelConfig, ids: torch.Tensor, args) -> tuple[dict, list]:
    """A worker process per model kind; returns their pipes and processes."""
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for kind in kinds:
        here, there = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(there, kind, cfg.model_dump_json(), ids, args.threads,
                                              KEEP[args.host_memory][kind], args.device, args.compile), daemon=True)
        p.start()
        there.close()   # the child holds its end: if it dies, recv() here raises EOFError, no hang
        conns[kind] = here
        procs.append(p)
    return conns, procs


def stop_workers(conns: dict, procs: list) -> None:
    for c, p in zip(conns.values(), procs, strict=True):
        with contextlib.suppress(OSError):          # that worker is gone already (its error is on stderr)
            c.send(None)
        p.join(timeout=60)
        if p.is_alive():
            p.kill()


def run_config(name: str, cfg: ModelConfig, batch: int, seq_len: int, modes: list[str], peak: float | None,
               args) -> tuple[dict[str, float], list[str]]:
    """One model config: the three workers, a table row per mode; returns RESULT entries and TARGET lines."""
    (fpt, fpt_full, formula), tokens = flops_per_token(cfg, seq_len), batch * seq_len
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    print(f"\n## {name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, "
          f"batch {batch} × {seq_len} tokens, fused AdamW"
          + (f", moelab and the dense limit with train.compile = {args.compile!r}" if args.compile else "")
          + f", median of {args.reps} after {args.warmup} warm-up\n")
    print(f"FLOPs/token = {formula}; MFU = tokens/s · FLOPs/token / peak. (Attention counted non-causal, "
          f"as the issue's baseline: {fpt_full / 1e9:.3f} GFLOP, MFU x{fpt_full / fpt:.3f}.)\n")
    print("| config | params | mode | moelab tokens/s | moelab MFU | transformers tokens/s | transformers MFU "
          "| ratio | dense-limit tokens/s | ratio bound (dense limit vs transformers) | first loss moelab / hf |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    # On a GPU the models take turns: each worker lives alone on the device (three at once would hold ~2x
    # the 4-layer V2-Lite's 35 GB of fp32 weights, gradients and AdamW moments each); on the CPU they run
    # side by side, their steps interleaved, so drift on a shared machine hits every model alike.
    kinds = [k for k in KINDS if k in args.kinds]
    groups = [[k] for k in kinds] if args.device.startswith("cuda") or args.turns else [kinds]
    res: dict[str, dict] = {mode: dict.fromkeys(set(KINDS) - set(kinds), NOT_RUN) for mode in modes}
    n_params = float("nan")
    for group in groups:
        conns, procs = start_workers(group, cfg, ids, args)
        try:
            live = {}
            for kind, c in conns.items():
                try:
                    built = c.recv()
                except EOFError:
                    built = ("error", "worker process died while building (see stderr)")
                if built[0] != "ok":
                    for mode in modes:
                        res[mode][kind] = built[1]
                    continue
                live[kind] = c
                if kind != "dense" and n_params != n_params:
                    n_params = built[1]
            for mode in modes:
                res[mode] |= step_times(live, mode, args.reps, args.warmup)
        finally:
            stop_workers(conns, procs)
    summary, targets = {}, []
    for mode in modes:
        s, t = report(name, mode, res[mode], n_params, tokens, fpt, peak)
        summary |= s
        targets += t
    return summary, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "100m"], choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", choices=MODES, help="default: float32 autocast (CPU), autocast bf16 (CUDA)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                    help="old name of --modes: float32, bfloat16 (= autocast)")
    ap.add_argument("--batch", type=int, help="default: the preset's (8; v2lite-4l: 4)")
    ap.add_argument("--seq-len", type=int, help="default: the preset's (256; v2lite-4l: 2048)")
    ap.add_argument("--scale-down", type=int, default=1, help="divide widths, heads and vocabulary (CPU dry runs)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per model first (kernel caches fill)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", action="store_true", help="models take turns, one process at a time (CUDA: always)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: benchmarks/gpu.sh)")
    ap.add_argument("--peak-flops", type=float, help=f"peak for MFU (default on CUDA: {PEAK:.3g}; none on CPU)")
    ap.add_argument("--host-memory", choices=list(KEEP), default="shipped",
                    help="shipped: each library as its users run it — moelab's trainer keeps freed host memory "
                         "for reuse (moelab.train.host_memory), a transformers process has glibc's default; "
                         "keep / release: the same setting for all (equal footing)")
    ap.add_argument("--compile", nargs="?", const="blocks", choices=["dense", "blocks"], default=False,
                    help="moelab and its dense limit with train.compile: whole blocks (the default) or their dense "
                         "parts, compiled in the warm-up steps; then the table and RESULT keys say _compiled_...")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="which models run (default: all)")
    ap.add_argument("--compile-experts", action="store_true",
                    help="torch.compile the expert activation math (compile time is spent in the warm-up steps)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    modes = args.modes or [{"float32": "float32", "bfloat16": "autocast"}[d] for d in args.dtypes or []] \
        or (["autocast", "bf16"] if cuda else ["float32", "autocast"])
    peak = args.peak_flops or (PEAK if cuda else None)
    where = torch.cuda.get_device_name(args.device) if cuda else f"{args.threads} threads"
    print(f"{where}; host memory: {args.host_memory} "
          f"({', '.join(f'{k} ' + ('keeps' if v else 'releases') for k, v in KEEP[args.host_memory].items())}); "
          f"MFU peak: {f'{peak:.3g} FLOP/s' if peak else 'none (CPU)'}")
    summary, targets = {}, []
    for name in args.configs:
        path, overrides, batch, seq_len = CONFIGS[name]
        cfg = load_model_config(path).model_copy(update=overrides | {"compile_experts": args.compile_experts})
        if args.scale_down > 1:
            cfg, name = scale_down(cfg, args.scale_down), f"{name}/{args.scale_down}"
        name += f"_compiled_{args.compile}" if args.compile else ""     # RESULT keys of their own
        cfg = type(cfg)(**cfg.model_dump())            # validated
        s, t = run_config(name, cfg, args.batch or batch, args.seq_len or seq_len, modes, peak, args)
        summary, targets = summary | s, targets + t
    print("\n" + "".join(line + "\n" for line in targets), end="")
    print("RESULT " + " ".join(f"{k}={v:.3f}" if abs(v) < 10 else f"{k}={v:.1f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
