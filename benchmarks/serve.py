"""Load test of ``moelab serve``: throughput and time-to-first-token / inter-token latency at 1, 8 and 32
concurrent streaming clients, with the same load against ``transformers serve`` on the same checkpoint.

    python benchmarks/serve.py                                  # a fresh configs/tiny.toml checkpoint (~2 min)
    python benchmarks/serve.py --checkpoint runs/tiny/model --max-tokens 64 --requests 4
    python benchmarks/serve.py --config configs/deepseek-v2-lite.toml --device cuda --dtype bfloat16   # on a GPU

Each client sends ``--requests`` streaming ``/v1/completions`` requests one after another (greedy,
``--max-tokens`` new tokens, prompts of 16-48 tokens). A request counts as failed unless it answered 200 and its
stream ended (``data: [DONE]``, or a chunk with a ``finish_reason``: transformers serve sends no ``[DONE]`` on
completions). Latencies are taken per streamed chunk: one per token for moelab; transformers serve merges the
tokens of a partial UTF-8 character into one chunk, so its inter-chunk latency may span several tokens.
Prints a markdown table and one ``RESULT`` line per server and concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake "
          "the darling buds of May, and summer's lease hath all too short a date.")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> str | None:
    """None once ``url`` answers 200, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}: {proc.stderr.read()[-800:].strip()}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return None
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return f"did not answer {url} within {timeout:.0f} s"


async def one_request(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> dict:
    prompt = PROMPT[: 16 + (i * 7) % 33]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps, done, finish = [], False, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "why": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or []
                    if choices:
                        stamps.append(time.perf_counter())
                        finish = choices[0].get("finish_reason") or finish
    except httpx.HTTPError as e:
        return {"ok": False, "why": type(e).__name__}
    if not (done or finish) or not stamps:
        return {"ok": False, "why": "the stream ended without [DONE] or a finish_reason"}
    # a chunk may carry several tokens (transformers serve holds back partial characters): count a request that
    # stopped for length as max_tokens tokens
    tokens = max_tokens if finish == "length" else len(stamps)
    return {"ok": True, "ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "tokens": tokens}


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def run_client(c: int) -> list[dict]:
            return [await one_request(client, url, model, c * requests + k, max_tokens) for k in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(run_client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    gaps = [g for r in ok for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "why": sorted({r["why"] for r in results if not r["ok"]}),
            "tok_s": sum(r["tokens"] for r in ok) / wall, "ttft50": pct([r["ttft"] for r in ok], 50),
            "ttft99": pct([r["ttft"] for r in ok], 99), "itl50": pct(gaps, 50), "itl99": pct(gaps, 99)}


def run_server(name: str, cmd: list[str], health: str, url: str, model: str, args) -> tuple[list[dict], str | None]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        why = wait_up(health, proc)
        if why is None:   # one warm-up request (first-call costs: lazy loading, allocator)
            probe = asyncio.run(load(url, model, 1, 1, 4))
            why = None if probe["failed"] == 0 else f"a test request failed: {probe['why']}"
        if why is not None:
            return [], f"{name} could not be run: {why}"
        rows = []
        for c in args.concurrency:
            rows.append(asyncio.run(load(url, model, c, args.requests, args.max_tokens)) | {"server": name})
            print(f"  {name} @ {c} clients: {rows[-1]['tok_s']:.1f} tok/s, {rows[-1]['failed']} failed", flush=True)
        return rows, None
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: init --config, random weights)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml",
                    help="model config initialised when --checkpoint is not given (e.g. configs/deepseek-v2-lite.toml)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both servers)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights (both servers)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    args = ap.parse_args()
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
        ckpt = tmp / "tiny"
        init = [sys.executable, "-m", "moelab", "init", str(args.config), "--out", str(ckpt), "--dtype", args.dtype]
        subprocess.run(init, check=True, stdout=subprocess.DEVNULL)
    name = ckpt.resolve().name
    print(f"checkpoint {ckpt}; {args.device}, {args.dtype}; CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores", flush=True)
    base = f"http://127.0.0.1:{args.port}"
    rows, notes = [], []
    r, why = run_server("moelab serve", [sys.executable, "-m", "moelab", "serve", str(ckpt), "--port", str(args.port),
                                         "--device", args.device, "--dtype", args.dtype, "--log-level", "warning",
                                         "--max-batch", "32"],
                        base + "/health", base + "/v1/completions", name, args)
    rows += r
    notes += [why] if why else []
    if not args.no_peer:
        cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
        if cli is None:
            notes.append("transformers serve could not be run: no `transformers` command (pip install transformers)")
        else:
            peer_port = args.port + 1
            pbase = f"http://127.0.0.1:{peer_port}"
            r, why = run_server("transformers serve", [cli, "serve", str(ckpt.resolve()), "--port", str(peer_port),
                                                       "--device", args.device, "--dtype", args.dtype],
                                pbase + "/health", pbase + "/v1/completions", str(ckpt.resolve()), args)
            rows += r
            notes += [why] if why else []
    print("\n| server | clients | requests | failed | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['server']} | {x['clients']} | {x['requests']} | {x['failed']} | {x['tok_s']:.1f} | "
              f"{x['ttft50'] * 1e3:.1f} | {x['ttft99'] * 1e3:.1f} | {x['itl50'] * 1e3:.1f} | {x['itl99'] * 1e3:.1f} |")
    for n in notes:
        print(f"\nnote: {n}")
    by = {(x["server"], x["clients"]): x for x in rows}
    for x in rows:
        peer = by.get(("transformers serve", x["clients"]))
        ratio = f" ratio_to_transformers_serve={x['tok_s'] / peer['tok_s']:.2f}" \
            if peer and x["server"] == "moelab serve" and peer["tok_s"] else ""
        print(f"RESULT serve server={x['server'].replace(' ', '_')} clients={x['clients']} tok_s={x['tok_s']:.1f} "
              f"ttft_p50_ms={x['ttft50'] * 1e3:.1f} ttft_p99_ms={x['ttft99'] * 1e3:.1f} "
              f"itl_p50_ms={x['itl50'] * 1e3:.1f} itl_p99_ms={x['itl99'] * 1e3:.1f} failed={x['failed']}{ratio}")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
