"""Decoding throughput: moelab's decode modes against transformers ``generate``, and the bandwidth roofline.

    python benchmarks/decode.py                                   # v2lite on CUDA, tiny on the CPU
    python benchmarks/decode.py --device cpu --shapes tiny --cases 1x512 --new 16
    python benchmarks/decode.py --shapes v2lite --layers 2 --device cpu --cases 1x64 --new 8   # a dry run

Shapes (``--shapes``):

* ``tiny`` — configs/tiny.toml with an 8K context, random fp32 weights saved as one Hugging Face
  checkpoint that both moelab and transformers load; cases batch 1 and 8 × contexts 512 and 4096, 32 new
  tokens, median of 3 interleaved runs after a warm-up round.
* ``v2lite`` — DeepSeek-V2-Lite's full shapes (configs/deepseek-v2-lite.toml: 27 layers, 15.7B parameters),
  random bf16 weights drawn on the device (no checkpoint); cases batch 1 after a 4,096-token prompt and
  batch 32 after 512-token prompts, 128 new tokens, one timed run after a short warm-up. transformers is
  skipped unless ``--hf`` (about a minute more: the issue measured it at 13.2 and 275 tokens/s); it then
  runs with its own random weights, so its tokens are not compared.

Columns, moelab ``generate(decode=...)`` (:mod:`moelab.infer.static`): ``dynamic`` (growable cache, eager
steps), ``static`` (preallocated cache, eager steps), ``graph`` (static, each step one CUDA graph; CUDA
only), ``compile`` (static, torch.compile'd layers and a CUDA graph; on by default on CUDA, skipped for a
case when less than ``--compile-margin`` seconds of ``--budget`` are left), then transformers. Greedy.

Timing: every generated token is timestamped — CUDA events recorded from moelab's ``on_token`` and a
transformers streamer, so nothing waits for the device — and decode tokens/s = batch·(new − 1) / (last −
first token), so the prefill and any compiling / capturing (done before the first token) are excluded.

Roofline: the bytes a step must read at least — the weights it touches (all but the embedding table and
the routed experts, plus the routed experts the batch hits: E·(1 − (1 − K/E)^B) per layer expected under
uniform routing) and the cache (B × mean cached length × cache bytes per token) — over ``--bandwidth``
(by the GPU's name: H200 4.8 TB/s, H100 3.35 TB/s; an H200's on the CPU). Each case prints one ``RESULT``
line as soon as it is done.
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

MODES = ("dynamic", "static", "graph", "compile")
TARGETS = {(1, 4096): 400.0, (32, 512): 2500.0}     # issue 14, v2lite on one H200 (tokens/s)


class Clock:
    """Timestamps every generated token; works as a transformers streamer and as moelab's on_token."""

    def __init__(self, cuda: bool = False):
        self.marks: list = []
        self.prompt_seen = False
        self.cuda = cuda

    def _stamp(self):
        if self.cuda:                           # an event: when the device gets there, without waiting for it
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

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
        if self.cuda:
            self.marks[-1].synchronize()
            return self.marks[0].elapsed_time(self.marks[-1]) / 1e3
        return self.marks[-1] - self.marks[0]


def decode_rates(runs, batch: int, new: int, reps: int, warmup_new: list[int], cuda: bool):
    """Median decode tokens/s of each run over ``reps`` rounds, interleaved (a, b, a, b, ...) so drift on a
    shared machine hits every run alike, after one warm-up round (``warmup_new`` tokens for each run); and the
    tokens of each run's last round."""
    for run, n in zip(runs, warmup_new, strict=True):
        run(Clock(cuda), n)
    rates: list[list[float]] = [[] for _ in runs]
    outputs = [None] * len(runs)
    for _ in range(reps):
        for i, run in enumerate(runs):
            clock = Clock(cuda)
            outputs[i] = run(clock, new)
            rates[i].append(batch * (new - 1) / clock.decode_seconds())
    return [statistics.median(r) for r in rates], outputs


def step_bytes(model: DeepSeekForCausalLM, batch: int, context: int, new: int) -> tuple[float, float]:
    """(weight bytes, cache bytes) one decode step reads at least, averaged over the ``new`` steps."""
    cfg = model.config
    E, K = cfg.n_routed_experts or 0, cfg.num_experts_per_tok or 0
    hit = E * (1 - (1 - K / E) ** batch) if E else 0.0
    weights = 0.0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            size = batch * p.shape[1] * p.element_size()       # a row per sequence
        elif ".mlp.experts." in name:
            size = size * hit / E
        weights += size
    cache = batch * (context + (new - 1) / 2) * cfg.cache_elems_per_token() * model.dtype.itemsize
    return weights, cache


def build_v2lite(device: str, layers: int | None) -> DeepSeekForCausalLM:
    """DeepSeek-V2-Lite with random bf16 weights drawn where they live (normal(0, 0.02); norms 1)."""
    cfg = load_model_config("configs/deepseek-v2-lite.toml")
    if layers:
        cfg = cfg.model_copy(update={"num_hidden_layers": layers})
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    model = model.to(torch.bfloat16)                           # on meta: the router weight stays fp32
    model.to_empty(device=device)
    model.init_weights(seed=0)
    return model.eval()


def build_tiny(device: str, max_len: int):
    """The tiny config saved as one checkpoint, loaded by moelab and by transformers (fp32)."""
    from transformers import AutoModelForCausalLM

    cfg = load_model_config("configs/tiny.toml")
    cfg = type(cfg)(**(cfg.model_dump() | {"max_position_embeddings": max_len}))
    with tempfile.TemporaryDirectory() as tmp:
        moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=0), tmp)
        ours = moelab.load(tmp, dtype=torch.float32).to(device).eval()
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
    return ours, hf


def hf_random(model: DeepSeekForCausalLM, device: str):
    """transformers' model of the same config with its own random weights, built on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moelab.interop.hf_config import config_to_hf

    raw = config_to_hf(model.config, torch_dtype="bfloat16")
    conf = AutoConfig.for_model(**raw)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).eval()


def hbm_bandwidth(gpu_name: str) -> float:
    """Peak memory bandwidth (bytes/s) of the GPU by its name: H100 SXM 3.35 TB/s (HBM3), H200 4.8 TB/s
    (HBM3e); anything else (and the CPU, where the roofline is only a reference) an H200's."""
    return 3.35e12 if "H100" in gpu_name else 4.8e12


def parse_case(text: str) -> tuple[int, int]:
    b, _, c = text.lower().partition("x")
    return int(b), int(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", choices=["tiny", "v2lite"], default=None, help="default: v2lite on cuda, else tiny")
    ap.add_argument("--cases", nargs="+", default=None, help="BATCHxCONTEXT (default: per --shapes)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default: tiny 32, v2lite 128)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default: tiny 3, v2lite 1)")
    ap.add_argument("--chunk", type=int, default=512, help="moelab prefill chunk")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: a tiny step is per-op overhead; a second thread only spin-waits)")
    ap.add_argument("--layers", type=int, default=None, help="v2lite with fewer layers (dry runs)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=None,
                    help="moelab columns (default: all the device runs; compile only on CUDA)")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                    help="run transformers (default: tiny yes, v2lite no)")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="bytes/s of the roofline (default: the GPU's by name — H200 4.8e12, H100 3.35e12 — "
                         "else an H200's)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds the whole run should take")
    ap.add_argument("--compile-margin", type=float, default=60.0,
                    help="skip a case's compile column when fewer seconds than this are left of --budget")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    shapes = args.shapes or ("v2lite" if cuda else "tiny")
    v2 = shapes == "v2lite"
    new = args.new or (128 if v2 else 32)
    reps = args.reps or (1 if v2 else 3)
    if args.cases:
        cases = [parse_case(c) for c in args.cases]
    else:
        cases = [(1, 4096), (32, 512)] if v2 else [(b, c) for b in (1, 8) for c in (512, 4096)]
    modes = args.modes or [m for m in MODES if cuda or m in ("dynamic", "static")]
    if not cuda and "graph" in modes:
        modes.remove("graph")
        print("graph: CUDA only, skipped")
    run_hf = (not v2) if args.hf is None else args.hf
    gpu_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else ""
    args.bandwidth = args.bandwidth or hbm_bandwidth(gpu_name)

    if v2:
        model = build_v2lite(args.device, args.layers)
        hf = hf_random(model, args.device) if run_hf else None
    else:
        model, hf = build_tiny(args.device, max(c for _, c in cases) + new + 8)
        hf = hf if run_hf else None
    cfg = model.config
    b = model_budget(cfg)
    print(f"shapes {shapes}: {cfg.num_hidden_layers} layers, {b.total_params / 1e6:,.1f}M parameters "
          f"({b.activated_params / 1e6:,.1f}M activated per token), {str(model.dtype).removeprefix('torch.')}, "
          f"on {args.device}; built in {time.perf_counter() - start:.1f} s")
    print(f"cache per token: {b.cache_elems_per_token} values ({b.cache_bytes_per_token} B in bf16) — MHA "
          f"equivalent {b.mha_cache_elems_per_token} ({b.mha_cache_bytes_per_token} B)")
    if v2 and not run_hf:
        print("transformers: skipped (about a minute at these shapes; the issue measured 13.2 tokens/s at batch 1 "
              "x 4096 and 275 at batch 32 x 512); --hf runs it")
    if not cuda:
        print(f"roofline: at {args.bandwidth / 1e12:.2f} TB/s (an H200's), not this machine's bandwidth")
    else:
        print(f"roofline: at {args.bandwidth / 1e12:.2f} TB/s ({gpu_name})")
    print()
    cols = [*modes, *(["transformers"] if hf is not None else [])]
    print(f"| batch | context | {' | '.join(cols)} | roofline tok/s | best / roofline "
          f"| tokens equal to the first column's |")
    print("|---|---|" + "---|" * (len(cols) + 3))
    greedy = SamplingConfig(greedy=True)
    for B, ctx in cases:
        ids = torch.randint(2, cfg.vocab_size, (B, ctx), device=args.device)
        notes: list[str] = []
        runs, names = [], []
        for mode in modes:
            if mode == "compile" and time.perf_counter() - start > args.budget - args.compile_margin:
                notes.append(f"compile skipped (less than {args.compile_margin:.0f} s of the "
                             f"{args.budget:.0f} s budget left)")
                continue
            report: dict = {}

            def ours(clock, n, mode=mode, report=report, ids=ids):
                return generate(model, ids, n, greedy, prefill_chunk=args.chunk, on_token=clock, decode=mode,
                                report=report)

            runs.append(ours)
            names.append((mode, report))
        if hf is not None:
            def theirs(clock, n, ids=ids):
                with torch.inference_mode():
                    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                       pad_token_id=0, streamer=clock)
            runs.append(theirs)
        t0 = time.perf_counter()
        # warm-up: v2lite's eager runs are slow, so a few tokens; the compiled one needs this run's shapes
        warm = [new if not v2 or m == "compile" else 4 for m, _ in names] + ([new if not v2 else 4] if hf else [])
        rates, outputs = decode_rates(runs, B, new, reps, warm, cuda=cuda)
        for (mode, report) in names:
            if report.get("not_graphed"):
                notes.append(f"{mode}: not graphed: {report['not_graphed']}")
            if report.get("not_compiled"):
                notes.append(f"{mode}: not compiled: {report['not_compiled']}")
            if report.get("setup_s", 0) > 0.5:
                notes.append(f"{mode}: {report['setup_s']:.1f} s to compile/capture (not timed)")
        labels = [m for m, _ in names] + (["transformers"] if hf is not None and not v2 else [])
        ref = outputs[0][:, ctx:]
        same = [f"{label} {int((out[:, ctx:] == ref).sum())}/{ref.numel()}"
                for label, out in zip(labels[1:], outputs[1:], strict=False)]
        w, c = step_bytes(model, B, ctx, new)
        roof = B * args.bandwidth / (w + c)
        best = max(rates[:len(names)])
        cells = " | ".join(f"{r:,.1f}" for r in rates)
        print(f"| {B} | {ctx} | {cells} | {roof:,.0f} | {best / roof:.1%} | {', '.join(same) or '—'} |")
        print(f"  bytes per step: {w / 1e9:.2f} GB weights + {c / 1e9:.3f} GB cache; "
              f"{time.perf_counter() - t0:.0f} s for this case")
        for note in notes:
            print(f"  {note}")
        values = {m: r for (m, _), r in zip(names, rates, strict=False)}
        if hf is not None:
            values["transformers"] = rates[-1]
        line = " ".join(f"{k}_tok_s={v:.1f}" for k, v in values.items())
        target = TARGETS.get((B, ctx)) if v2 and not args.layers else None
        met = "" if target is None else f" target_tok_s={target:.0f} met={'yes' if best >= target else 'no'}"
        print(f"RESULT shapes={shapes} batch={B} context={ctx} new={new} {line} roofline_tok_s={roof:.0f} "
              f"best_frac={best / roof:.3f}{met}", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
