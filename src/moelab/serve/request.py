"""What the HTTP side hands the engine, and what the engine sends back.

A :class:`GenerationRequest` is one API call: one or more prompts (token ids), each answered by ``n``
choices, with the sampling and stopping settings. The engine reports through ``sink(event)`` — called from the
engine thread, so the HTTP side makes it thread-safe — with :class:`Delta` events (new text and tokens of one
choice, the last one with its ``finish_reason``), one :class:`PromptLogprobs` per prompt when asked for
(``echo`` + ``logprobs``) and a :class:`Failure` if the request cannot go on.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moelab.infer.sampling import SamplingConfig

_ids = itertools.count(1)


@dataclass
class TokenLogprob:
    """A token, its log-probability under the model (raw logits, before temperature) and the ``top`` others."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    choice: int
    text: str
    tokens: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class PromptLogprobs:
    """Per-token log-probabilities of prompt ``prompt`` (the first token has none); for ``echo``."""

    prompt: int
    logprobs: list[TokenLogprob]


@dataclass
class Failure:
    message: str


Event = Delta | PromptLogprobs | Failure


@dataclass
class GenerationRequest:
    """One API request. Choice ``i`` answers prompt ``i // n``."""

    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingConfig
    sink: Callable[[Event], None]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None           # top-k alternatives per token (0 = only the chosen token), None = off
    echo: bool = False                    # with logprobs: score the prompt tokens too
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False               # set by any thread; the engine frees the blocks at its next step

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def cache_tokens(self) -> int:
        """Tokens of cache the whole request may need at once (every choice: prompt + new tokens)."""
        return sum(len(p) + self.max_tokens for p in self.prompts) * self.n


__all__ = ["Delta", "Event", "Failure", "GenerationRequest", "PromptLogprobs", "TokenLogprob"]
