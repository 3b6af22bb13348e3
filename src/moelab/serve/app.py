"""The FastAPI application: OpenAI-compatible endpoints over an :class:`~moelab.serve.engine.Engine`.

    app = create_app(engine, tokenizer, ServerSettings(model_name="tiny", limits=Limits(...)))

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). With an API key,
``/v1/*`` want ``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` stay open (probes and scrapers).

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a matching status: 400 bad
input (body not UTF-8 / not JSON / bad fields / prompt too long / unknown parameter values), 401 no or wrong
key, 404 unknown model or path, 413 body too large, 503 queue full or shutting down, 504 past the request
timeout. Each request waits on an ``asyncio.Queue`` that the engine thread fills; a client that goes away (or
times out) cancels its request, and the engine frees its blocks at its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelab.infer.sampling import SamplingConfig
from moelab.serve.api_error import ApiError
from moelab.serve.engine import Engine
from moelab.serve.protocol import ChatBody, CompletionBody, Limits, check_lengths, parse_body
from moelab.serve.request import Failure, GenerationRequest
from moelab.serve.responses import Response

#: How often a waiting handler checks whether its client is still there (seconds).
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerSettings:
    model_name: str
    limits: Limits
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0


class Tokens:
    """The text side of a ``tokenizers.Tokenizer``: encoding prompts, decoding outputs, naming tokens."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.chat = None
        self.no_chat = None
        from moelab.data.chat import ChatFormat
        from moelab.errors import DataError

        try:
            self.chat = ChatFormat(tokenizer, "deepseek")
        except DataError as e:
            self.no_chat = str(e)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token as text; a token that is part of a character shows as its byte-level symbol."""
        s = self.tok.decode([token], skip_special_tokens=False)
        return s if "\ufffd" not in s else (self.tok.id_to_token(token) or s)


def create_app(engine: Engine, tokenizer, settings: ServerSettings) -> FastAPI:
    """The app serving ``engine``; the engine thread starts with the app and drains when it shuts down."""
    tokens = Tokens(tokenizer)
    metrics = engine.metrics
    state = {"closing": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.started:
            engine.start()
        yield
        state["closing"] = True
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="moelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        metrics.count_request(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"no such endpoint: {request.method} {request.url.path}" if e.status_code in (404, 405) \
            else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        metrics.count_request(request.url.path, 500)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {int(declared):,} bytes; this server accepts at most {limit:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body exceeds {limit:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{settings.model_name}'",
                           param="model", code="model_not_found")

    def sampling_of(body) -> SamplingConfig:
        return SamplingConfig(greedy=body.temperature == 0, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, seed=body.seed)

    async def serve(request: Request, kind: str):
        authorize(request)
        body = parse_body(await read_body(request), ChatBody if kind == "chat" else CompletionBody)
        check_model(body.model)
        if state["closing"]:
            raise ApiError(503, "the server is shutting down")
        limits = settings.limits
        if kind == "chat":
            if tokens.chat is None:
                raise ApiError(400, f"this checkpoint cannot chat: {tokens.no_chat}; use /v1/completions")
            prompts = [tokens.chat.prompt_ids(body.message_dicts())]
            asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            room = max(0, min(limits.max_tokens, limits.context - len(prompts[0])))
            max_tokens = asked if asked is not None else room
            top = (body.top_logprobs or 0) if body.logprobs else None
            echo, texts = False, None
        else:
            raw = body.prompt_list()
            prompts = [tokens.encode(p) if isinstance(p, str) else list(p) for p in raw]
            texts = [p if isinstance(p, str) else tokens.decode(p) for p in raw] if body.echo else None
            max_tokens = body.max_tokens if body.max_tokens is not None else limits.default_max_tokens
            top, echo = body.logprobs, body.echo
        check_lengths(prompts, max_tokens, limits, engine.model.config.vocab_size)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(ev) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:     # the loop is gone (shutdown): nobody is listening
                pass

        req = GenerationRequest(prompts, max_tokens, sampling_of(body), sink, n=body.n, stop=body.stops(),
                                logprobs=top, echo=echo)
        engine.submit(req)
        metrics.count_request(request.url.path, 200)
        out = Response(kind, settings.model_name, req, tokens.token_text, texts)
        events = _events(engine, req, queue, request, settings.request_timeout)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(events, out, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async for ev in events:
            out.add(ev)
        return JSONResponse(out.body())

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "moelab", "max_model_len": settings.limits.context}]}

    @app.get("/health")
    async def health():
        if state["closing"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _events(engine: Engine, req: GenerationRequest, queue: asyncio.Queue, request: Request,
                  timeout: float) -> AsyncIterator:
    """The engine's events for ``req`` until every choice finished; cancels ``req`` on a disconnect, a timeout
    (then raises a 504 :class:`ApiError`) or when the consumer stops early."""
    deadline = time.monotonic() + timeout
    finished, last_poll = 0, time.monotonic()
    try:
        while finished < req.choices:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, f"the request did not finish within the server's timeout of {timeout:g} s")
            try:
                ev = await asyncio.wait_for(queue.get(), min(left, DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() - last_poll >= DISCONNECT_POLL_S or ev is None:
                last_poll = time.monotonic()
                if await request.is_disconnected():
                    return
            if ev is None:
                continue
            if isinstance(ev, Failure):
                raise ApiError(500, ev.message)
            finished += getattr(ev, "finish_reason", None) is not None
            yield ev
    finally:
        if finished < req.choices:
            engine.cancel(req)


async def _sse(events: AsyncIterator, out: Response, usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one ``data:`` line per chunk, an error object if the request fails, then ``[DONE]``."""
    try:
        try:
            async for ev in events:
                out.add(ev)
                if hasattr(ev, "choice"):
                    yield f"data: {json.dumps(out.chunk(ev))}\n\n"
            if usage:
                yield f"data: {json.dumps(out.usage_chunk())}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()

__all__ = ["DISCONNECT_POLL_S", "ServerSettings", "Tokens", "create_app"]
