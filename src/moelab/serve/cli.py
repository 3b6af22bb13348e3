"""``moelab serve CKPT``: the OpenAI-compatible HTTP server (needs the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from moelab.cli_utils import err, friendly, resolve_device
from moelab.errors import MoelabError


@friendly
def serve(
    checkpoint: Annotated[Path, typer.Argument(
        help="Checkpoint directory (config.json + safetensors + tokenizer.json).")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model_name: Annotated[str | None, typer.Option(
        help="Name clients use in 'model' (default: the checkpoint directory's name).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Require 'Authorization: Bearer KEY' on /v1/* (default: $MOELAB_API_KEY; none = open).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when available).")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16 (default: as stored).")] = None,
    cache_tokens: Annotated[int, typer.Option(
        help="Paged-cache budget in tokens, over all requests (MLA: latent + RoPE key per token and layer). "
             "Requests beyond it wait in the queue.")] = 16384,
    block_size: Annotated[int, typer.Option(help="Tokens per cache block.")] = 16,
    max_batch: Annotated[int, typer.Option(help="Most choices decoded together in one step.")] = 32,
    max_waiting: Annotated[int, typer.Option(help="Queued requests beyond which new ones get 503.")] = 64,
    prefill_chunk: Annotated[int, typer.Option(
        help="Prompt tokens fed per forward (and per scheduler step): bounds how long a long prompt "
             "stalls the running requests.")] = 512,
    max_prompt_tokens: Annotated[int | None, typer.Option(
        help="Longest prompt accepted (default: the model's context - 1).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens one choice may ask for.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 beyond).")] = 1 << 20,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request is cut off (504).")] = 600.0,
    limit_concurrency: Annotated[int, typer.Option(help="Open connections beyond which uvicorn answers 503.")] = 256,
    drain_timeout: Annotated[float, typer.Option(
        help="On SIGTERM / Ctrl-C: seconds to let running requests finish before exiting.")] = 60.0,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug (debug logs each request).")
                         ] = "info",
):
    """Serve a checkpoint over an OpenAI-compatible HTTP API, batching concurrent requests.

    Endpoints: /v1/completions and /v1/chat/completions (streaming with "stream": true; temperature, top_p,
    max_tokens, stop, seed, n; logprobs and echo on completions), /v1/models, /health, /metrics (Prometheus).
    New requests join the running batch between decode steps; the cache is paged in blocks with a budget of
    --cache-tokens, and requests beyond it wait (503 once --max-waiting are queued). SIGTERM drains the running
    requests and exits.

    \b
        moelab serve runs/tiny/model --port 8000
        curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
             -d '{"prompt": "To be", "max_tokens": 16, "temperature": 0}'

    Any OpenAI client works: openai.OpenAI(base_url="http://localhost:8000/v1", api_key="-").

    Needs the serve extra: pip install 'moelab[serve]'.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MoelabError("moelab serve needs FastAPI and uvicorn: pip install 'moelab[serve]'") from None
    from moelab.serve.server import ServeOptions, build_server, run_server

    levels = ("critical", "error", "warning", "info", "debug")
    if log_level not in levels:
        raise MoelabError(f"--log-level must be one of {', '.join(levels)} (got {log_level})")
    if dtype not in (None, "float32", "bfloat16"):
        raise MoelabError(f"--dtype must be float32 or bfloat16 (got {dtype})")
    opts = ServeOptions(checkpoint=checkpoint, host=host, port=port, model_name=model_name, dtype=dtype,
                        device=resolve_device(device), cache_tokens=cache_tokens, block_size=block_size,
                        max_batch=max_batch, max_waiting=max_waiting, prefill_chunk=prefill_chunk,
                        max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_body_bytes=max_body_bytes,
                        request_timeout=request_timeout, api_key=api_key, limit_concurrency=limit_concurrency,
                        drain_timeout=drain_timeout, log_level=log_level)
    opts.check()
    opts.check_port()
    app, engine = build_server(opts)
    pool = engine.pool
    name = escape(opts.model_name or checkpoint.resolve().name)
    err.print(f"serving [bold]{escape(str(checkpoint))}[/] as '{name}' "
              f"on http://{host}:{port}/v1 — cache {pool.capacity_tokens:,} tokens in {pool.num_blocks} blocks "
              f"({pool.bytes() / 2**20:.1f} MiB), up to {max_batch} choices per step; Ctrl-C or SIGTERM drains "
              "and stops", highlight=False)
    run_server(app, opts)


__all__ = ["serve"]
