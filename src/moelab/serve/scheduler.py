"""Continuous batching: which requests wait, which prefill, which decode — and the cache blocks they hold.

Three stages, in order of arrival:

* **waiting** — accepted requests (at most ``max_waiting``; more are refused with 503, never crash the server);
* **prefilling** — admitted prompts (a :class:`PromptGroup`: one prompt and its ``n`` choices), fed to the model
  one chunk at a time;
* **running** — :class:`Choice` objects in the batched decode step.

**Admission** is first come, first served: the head of the queue is admitted when the pool can *book* the
blocks of its worst case (every choice's prompt + ``max_tokens``) and the batch has room for its choices;
a later request never overtakes it (no starvation of long requests). Booking the worst case means a running
sequence never waits for a block: nothing is ever preempted or recomputed, at the price of admitting fewer
requests than lazily-grown sequences would. Blocks are taken as tokens are written and go back, with the
booking, when a choice finishes or its request is cancelled (a client that disconnects or times out).

Only the engine thread calls these methods, except :meth:`Scheduler.enqueue` and the counters, which take the
lock the engine waits on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moelab.serve.api_error import ApiError
from moelab.serve.paged_cache import BlockPool, PagedSequence
from moelab.serve.request import GenerationRequest, TokenLogprob
from moelab.serve.text import TextStream


@dataclass(eq=False)
class Choice:
    """One answer being generated: its request, prompt, tokens so far, cache sequence and text stream."""

    req: GenerationRequest
    index: int
    prompt: list[int]
    seq: PagedSequence
    text: TextStream
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    done: bool = False


@dataclass(eq=False)
class PromptGroup:
    """One prompt of a request, prefilled once into ``choices[0]``'s blocks and copied to the others."""

    req: GenerationRequest
    prompt_index: int
    prompt: list[int]
    choices: list[Choice]
    prefilled: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


class Scheduler:
    """The three stages over one :class:`BlockPool`. ``decode(ids) -> str`` makes each choice's text stream."""

    def __init__(self, pool: BlockPool, decode, max_waiting: int = 64, max_batch: int = 32):
        self.pool, self.decode = pool, decode
        self.max_waiting, self.max_batch = max_waiting, max_batch
        self.lock = threading.Condition()
        self.waiting: deque[GenerationRequest] = deque()
        self.prefilling: deque[PromptGroup] = deque()
        self.running: list[Choice] = []

    # -- called by any thread (under the lock) --------------------------------------------------------
    def blocks_needed(self, req: GenerationRequest) -> int:
        return sum(self.pool.blocks_for(len(p) + req.max_tokens) for p in req.prompts) * req.n

    def enqueue(self, req: GenerationRequest) -> None:
        """Accept ``req`` into the queue, or refuse it with a 400 (can never fit) or 503 (queue full)."""
        need = self.blocks_needed(req)
        if need > self.pool.num_blocks:
            raise ApiError(400, f"this request needs {need * self.pool.block_size} tokens of cache at once "
                                f"({req.choices} choice(s) of prompt + max_tokens) and the server holds "
                                f"{self.pool.capacity_tokens}; lower max_tokens or n, or send fewer prompts")
        if req.choices > self.max_batch:
            raise ApiError(400, f"this request asks for {req.choices} choices and the server decodes at most "
                                f"{self.max_batch} at once; lower n or send fewer prompts", param="n")
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise ApiError(503, f"the server is busy: {len(self.waiting)} requests are already waiting; "
                                    "retry shortly", headers={"Retry-After": "1"})
            self.waiting.append(req)
            self.lock.notify_all()

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # (read by the metrics scrape on another thread: tuple() snapshots a container in one step under the GIL,
    # where iterating a deque that the engine changes meanwhile would raise)
    def in_flight(self) -> int:
        """Choices admitted and not finished."""
        return sum(len(g.choices) for g in tuple(self.prefilling)) + len(self.running)

    def cached_tokens(self) -> int:
        return (sum(c.seq.length for c in tuple(self.running))
                + sum(g.choices[0].seq.length for g in tuple(self.prefilling)))

    # -- engine thread ----------------------------------------------------------------------------------
    def admit(self) -> None:
        """Move requests from the head of the queue to prefilling while their blocks can be booked."""
        with self.lock:
            while self.waiting:
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    continue
                if self.in_flight() + req.choices > self.max_batch:
                    break
                need = self.blocks_needed(req)
                if not self.pool.reserve(need):
                    break
                self.waiting.popleft()
                self.prefilling.extend(self._groups(req))

    def _groups(self, req: GenerationRequest) -> list[PromptGroup]:
        groups = []
        for p, prompt in enumerate(req.prompts):
            choices = []
            for k in range(req.n):
                i = p * req.n + k
                gen = None
                if req.sampling.seed is not None:
                    gen = torch.Generator(device=self.pool.device).manual_seed(req.sampling.seed + i)
                seq = PagedSequence(reserved=self.pool.blocks_for(len(prompt) + req.max_tokens))
                choices.append(Choice(req, i, prompt, seq, TextStream(self.decode, req.stop), gen))
            groups.append(PromptGroup(req, p, prompt, choices))
        return groups

    def finish(self, choice: Choice) -> None:
        """Release the choice's blocks; it leaves the running batch at the next :meth:`sweep`."""
        if not choice.done:
            choice.done = True
            choice.seq.release(self.pool)

    def sweep(self) -> None:
        """Drop finished choices and everything of cancelled requests (their blocks go back to the pool)."""
        with self.lock:
            if any(r.cancelled for r in self.waiting):
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
        keep = deque()
        for g in self.prefilling:
            if g.req.cancelled:
                for c in g.choices:
                    self.finish(c)
            else:
                keep.append(g)
        self.prefilling = keep
        for c in self.running:
            if c.req.cancelled:
                self.finish(c)
        self.running = [c for c in self.running if not c.done]

    def start_decoding(self, group: PromptGroup) -> None:
        """The group's prompt is prefilled: its choices join the running batch."""
        self.prefilling.remove(group)
        now = time.perf_counter()
        for c in group.choices:
            c.last_token_at = now
        self.running.extend(c for c in group.choices if not c.done)

    def fail_all(self) -> list[GenerationRequest]:
        """Drop every admitted request (after an error in a forward); returns them, so they can be told."""
        reqs = {id(g.req): g.req for g in self.prefilling} | {id(c.req): c.req for c in self.running}
        for g in self.prefilling:
            for c in g.choices:
                self.finish(c)
        for c in self.running:
            self.finish(c)
        self.prefilling, self.running = deque(), []
        return list(reqs.values())


__all__ = ["Choice", "PromptGroup", "Scheduler"]
