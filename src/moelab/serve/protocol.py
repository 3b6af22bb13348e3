"""The OpenAI request bodies the server accepts, checked with pydantic, and their limits.

    body = parse_body(raw_bytes, CompletionBody)     # ApiError 400 for bad UTF-8, bad JSON, bad fields

``/v1/completions`` takes ``prompt`` (a string, a list of strings, token ids or lists of token ids), ``echo``
and ``logprobs`` (top alternatives per token, 0..20); ``/v1/chat/completions`` takes ``messages`` (system /
user / assistant, content a string or text parts), ``logprobs`` + ``top_logprobs``. Both: ``max_tokens``,
``temperature`` (0..2; 0 = greedy), ``top_p``, ``top_k`` (an extension), ``n``, ``stop`` (up to 4 strings),
``seed``, ``stream`` and ``stream_options.include_usage``. Fields other clients send and that change nothing
here (``user``, ``service_tier``, ...) are ignored; those that would change the output and are not supported
(penalties, ``logit_bias``, ``best_of`` other than ``n``, ``suffix``, tools) are refused with a 400 that says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moelab.serve.api_error import ApiError

#: Most choices one request may ask for (per prompt).
MAX_N = 16
#: Most alternatives per token in ``logprobs``.
MAX_LOGPROBS = 20


@dataclass
class Limits:
    """The server's bounds on a request (``moelab serve`` options)."""

    context: int                      # the model's context: prompt + max_tokens must fit
    max_prompt_tokens: int
    max_tokens: int                   # most new tokens per choice
    default_max_tokens: int = 16      # /v1/completions without max_tokens (OpenAI's default)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server; leave it at 0", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of is not supported (only best_of = n)", param="best_of")
        if len(self.stops()) > 4:
            raise ApiError(400, f"at most 4 stop strings (got {len(self.stops())})", param="stop")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise ApiError(400, "suffix is not supported; use moelab's fill-in-the-middle prompt instead",
                           param="suffix")

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompts as a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        return [p] if isinstance(p[0], int) else list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")
        roles = [m.role for m in self.messages]
        if roles[-1] != "user":
            raise ApiError(400, "the last message must be the user's (the server writes the assistant's answer)",
                           param="messages")
        if any(r in ("system", "developer") for r in roles[1:]):
            raise ApiError(400, "a system message may only come first", param="messages")

    def message_dicts(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """``raw`` request bytes -> a checked ``schema`` instance, or an :class:`ApiError` 400 that says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object (got {type(data).__name__})")
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise ApiError(400, f"invalid '{where}': {first['msg']}{more}", param=where.split(".")[0]) from None
    body.check_unsupported()
    return body


def check_lengths(prompts: list[list[int]], max_tokens: int, limits: Limits, vocab: int) -> None:
    """Refuse (400) empty or too-long prompts, ids outside the vocabulary, and outputs past the context."""
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                       param="max_tokens")
    for p in prompts:
        if not p:
            raise ApiError(400, "a prompt is empty (it encodes to no tokens)", param="prompt")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside this model's vocabulary [0, {vocab})", param="prompt")
        if len(p) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(p)} tokens; this server accepts at most "
                                f"{limits.max_prompt_tokens}", param="prompt")
        if len(p) + max_tokens > limits.context:
            raise ApiError(400, f"the prompt ({len(p)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                                f"context of {limits.context} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens")


__all__ = ["MAX_LOGPROBS", "MAX_N", "ChatBody", "CompletionBody", "Limits", "Message", "check_lengths",
           "parse_body"]
