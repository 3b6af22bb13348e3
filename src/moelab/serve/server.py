"""Build a server for a checkpoint and run it under uvicorn, with a graceful stop.

    app, engine = build_server(ServeOptions(checkpoint=Path("runs/tiny/model")))
    run_server(app, ServeOptions(...))            # blocks; SIGTERM / Ctrl-C drain and exit

**Stopping.** On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits up to ``drain_timeout``
seconds for the requests in progress — streams included — to finish; then the app's shutdown stops the engine
after it has finished every request it accepted. ``limit_concurrency`` caps open connections: beyond it uvicorn
answers 503 at once, so a flood of connections cannot exhaust the process.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import MoelabError
from moelab.serve.app import ServerSettings, create_app
from moelab.serve.engine import Engine
from moelab.serve.protocol import Limits

#: Environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "MOELAB_API_KEY"


@dataclass
class ServeOptions:
    """Everything ``moelab serve`` sets (its options carry the same names)."""

    checkpoint: Path
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    cache_tokens: int = 16384
    block_size: int = 16
    max_batch: int = 32
    max_waiting: int = 64
    prefill_chunk: int = 512
    max_prompt_tokens: int | None = None
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    api_key: str | None = None
    limit_concurrency: int = 256
    drain_timeout: float = 60.0
    log_level: str = "info"

    def check(self) -> None:
        for name in ("cache_tokens", "block_size", "max_batch", "max_waiting", "prefill_chunk", "max_tokens",
                     "max_body_bytes", "limit_concurrency"):
            if getattr(self, name) < 1:
                raise MoelabError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.request_timeout <= 0 or self.drain_timeout < 0:
            raise MoelabError("--request-timeout must be > 0 and --drain-timeout >= 0")
        if self.cache_tokens < self.block_size:
            raise MoelabError(f"--cache-tokens ({self.cache_tokens}) must hold at least one block "
                              f"(--block-size {self.block_size})")
        if not 0 <= self.port <= 65535:
            raise MoelabError(f"--port must lie in 0..65535 (got {self.port})")

    def check_port(self) -> None:
        """Refuse a host/port this process cannot listen on (taken, or not an address of this machine)
        before the model loads, rather than after, in uvicorn's words."""
        import socket

        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, address = infos[0]
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn (asyncio) binds
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(address)
        except OSError as e:
            where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            raise MoelabError(f"cannot listen on {where} ({e.strerror or e}); pick another --port (or --host), "
                              "or stop what is using it") from None


def build_server(opts: ServeOptions, progress: bool = True):
    """Load the checkpoint and its tokenizer; return ``(app, engine)`` (the engine starts with the app)."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.interop.checkpoint import load

    opts.check()
    tokenizer = load_tokenizer(opts.checkpoint)
    model = load(opts.checkpoint, dtype=opts.dtype, device=opts.device, progress=progress)
    cfg = model.config
    context = cfg.max_position_embeddings
    max_prompt = min(opts.max_prompt_tokens or context - 1, context - 1)
    if opts.max_prompt_tokens and opts.max_prompt_tokens > max_prompt:
        warnings.warn(f"--max-prompt-tokens {opts.max_prompt_tokens} exceeds the model's context of {context} "
                      f"tokens: prompts of up to {max_prompt} tokens are accepted", stacklevel=2)
    limits = Limits(context=context, max_prompt_tokens=max_prompt, max_tokens=min(opts.max_tokens, context - 1),
                    default_max_tokens=min(16, opts.max_tokens))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    engine = Engine(model, decode, eos_token_id=cfg.eos_token_id, cache_tokens=opts.cache_tokens,
                    block_size=opts.block_size, prefill_chunk=opts.prefill_chunk, max_waiting=opts.max_waiting,
                    max_batch=opts.max_batch)
    name = opts.model_name or opts.checkpoint.resolve().name
    key = opts.api_key if opts.api_key is not None else os.environ.get(API_KEY_ENV) or None
    settings = ServerSettings(model_name=name, limits=limits, api_key=key, max_body_bytes=opts.max_body_bytes,
                              request_timeout=opts.request_timeout)
    return create_app(engine, tokenizer, settings), engine


def run_server(app, opts: ServeOptions) -> None:
    """Serve ``app`` until SIGTERM / Ctrl-C, then drain (see the module docstring)."""
    import uvicorn

    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                            limit_concurrency=opts.limit_concurrency, timeout_graceful_shutdown=opts.drain_timeout,
                            access_log=opts.log_level == "debug")
    logging.getLogger("moelab.serve").setLevel(opts.log_level.upper())
    uvicorn.Server(config).run()


__all__ = ["API_KEY_ENV", "ServeOptions", "build_server", "run_server"]
