"""OpenAI response bodies built from the engine's events: whole responses and server-sent-event chunks.

    out = Response("chat", model_name, req, token_text)   # token_text(id) -> str, for logprobs
    for event in events: out.add(event)                    # Delta / PromptLogprobs from the engine
    out.body()                                             # the non-streaming JSON
    out.chunk(delta)                                       # one streaming chunk for a Delta

Completions: ``choices[i] = {index, text, logprobs, finish_reason}`` with the legacy logprobs object
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``; with ``echo`` the prompt's tokens come first
and its first token has no log-probability). Chat: ``choices[i] = {index, message | delta, logprobs,
finish_reason}`` with ``logprobs.content = [{token, logprob, bytes, top_logprobs}]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from moelab.serve.request import Delta, GenerationRequest, PromptLogprobs, TokenLogprob


class Response:
    """Accumulates one request's events. ``kind`` is ``completion`` or ``chat``; ``prompt_texts`` (for ``echo``)."""

    def __init__(self, kind: str, model: str, req: GenerationRequest, token_text: Callable[[int], str],
                 prompt_texts: list[str] | None = None):
        self.kind, self.model, self.req, self.token_text = kind, model, req, token_text
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        n = req.choices
        self.texts = [""] * n
        self.tokens: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.prompt_lps: dict[int, list[TokenLogprob]] = {}
        self.prompt_texts = prompt_texts or []
        self.completion_tokens = 0
        self.started = [False] * n

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def add(self, ev: Delta | PromptLogprobs) -> None:
        if isinstance(ev, PromptLogprobs):
            self.prompt_lps[ev.prompt] = ev.logprobs
            return
        self.texts[ev.choice] += ev.text
        self.completion_tokens += len(ev.tokens)
        self.tokens[ev.choice] += ev.logprobs or [TokenLogprob(t, None) for t in ev.tokens]
        if ev.finish_reason is not None:
            self.finish[ev.choice] = ev.finish_reason

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.req.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    # -- logprobs -------------------------------------------------------------------------------------
    def _legacy_logprobs(self, items: list[TokenLogprob], offset: int) -> dict:
        tokens, offsets, pos = [], [], offset
        for it in items:
            s = self.token_text(it.token)
            tokens.append(s)
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": [it.logprob for it in items],
                "top_logprobs": [None if it.logprob is None else {self.token_text(t): lp for t, lp in it.top}
                                 for it in items],
                "text_offset": offsets}

    def _chat_logprobs(self, items: list[TokenLogprob]) -> dict:
        def entry(t: int, lp: float) -> dict:
            s = self.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [entry(it.token, it.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in it.top]}
                            for it in items]}

    def _choice_logprobs(self, i: int, items: list[TokenLogprob], first: bool) -> dict | None:
        if self.req.logprobs is None:
            return None
        if self.kind == "chat":
            return self._chat_logprobs(items)
        prompt = self.req.echo and first
        lead = self.prompt_lps.get(i // self.req.n, []) if prompt else []
        return self._legacy_logprobs(lead + items, 0)

    def _echo(self, i: int) -> str:
        return self.prompt_texts[i // self.req.n] if self.req.echo and self.prompt_texts else ""

    # -- bodies -----------------------------------------------------------------------------------------
    def body(self) -> dict:
        choices = []
        for i in range(self.req.choices):
            lp = self._choice_logprobs(i, self.tokens[i], True)
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": self.texts[i]},
                                "logprobs": lp, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": self._echo(i) + self.texts[i], "logprobs": lp,
                                "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def chunk(self, ev: Delta) -> dict:
        """One streaming chunk for ``ev`` (the first chunk of a choice carries the role / the echoed prompt)."""
        first = not self.started[ev.choice]
        self.started[ev.choice] = True
        items = ev.logprobs or [TokenLogprob(t, None) for t in ev.tokens]
        lp = self._choice_logprobs(ev.choice, items, first) if ev.tokens or first else None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ev.text} if first else {"content": ev.text}
            choice = {"index": ev.choice, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
            obj = "chat.completion.chunk"
        else:
            text = (self._echo(ev.choice) if first else "") + ev.text
            choice = {"index": ev.choice, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage()}


__all__ = ["Response"]
