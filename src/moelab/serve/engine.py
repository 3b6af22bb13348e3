"""The engine: one thread that owns the model and runs the continuous-batching loop.

Legend: B running choices, T prompt tokens in a chunk, V vocabulary.

Each iteration of the loop (:meth:`Engine.step`):

1. **sweep** — finished choices and cancelled requests (disconnects, timeouts) leave; their blocks go back;
2. **admit** — queued requests whose worst-case blocks can be booked start prefilling (:mod:`.scheduler`);
3. **prefill** — prompts are fed one at a time (``[1, T]`` per forward against the :class:`PagedBatch`), in
   chunks of at most ``prefill_chunk`` tokens starting at multiples of it, until ``prefill_chunk`` tokens were
   fed this iteration; a finished prompt samples its choices' first tokens and joins the batch. Chunk
   boundaries depend only on the prompt, so a prompt's logits do not depend on what else is being served;
4. **decode** — one batched step for every running choice: last tokens ``[B, 1]`` against the left-padded
   gather of their blocks, logits ``[B, V]``, one token drawn per choice with its own settings and generator.

New requests thus join between decode steps, and a long prompt delays the running choices by at most one
chunk per step. Results go out through each request's ``sink`` (:mod:`.request`). An exception in a forward
fails the requests in flight (each told why) and the loop goes on serving.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from moelab.infer.sampling import sample_next
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.serve.api_error import ApiError
from moelab.serve.metrics import Metrics
from moelab.serve.paged_cache import BlockPool, PagedBatch
from moelab.serve.request import Delta, Failure, GenerationRequest, PromptLogprobs, TokenLogprob
from moelab.serve.scheduler import Choice, PromptGroup, Scheduler

log = logging.getLogger("moelab.serve")


class Engine:
    """Serves :class:`GenerationRequest` objects with ``model`` on its own thread.

    ``decode(ids) -> str`` turns token ids into text (special tokens skipped); ``eos_token_id`` ends a choice.
    ``cache_tokens`` is the paged cache's budget, ``block_size`` its block size, ``max_waiting`` the queue
    length beyond which requests are refused (503), ``max_batch`` the most choices decoded at once.
    """

    def __init__(self, model: DeepSeekForCausalLM, decode, *, eos_token_id: int | None, cache_tokens: int = 16384,
                 block_size: int = 16, prefill_chunk: int = 512, max_waiting: int = 64, max_batch: int = 32,
                 metrics: Metrics | None = None):
        self.model = model.eval()
        self.eos = eos_token_id
        self.prefill_chunk = max(1, prefill_chunk)
        self.pool = BlockPool.for_model(model, cache_tokens, block_size)
        self.sched = Scheduler(self.pool, decode, max_waiting, max_batch)
        self.decode = decode
        self.metrics = metrics or Metrics()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._register_gauges()

    def _register_gauges(self) -> None:
        s, g = self.sched, self.metrics.gauges
        g["moelab_requests_waiting"] = ("Requests queued for admission.", lambda: len(s.waiting))
        g["moelab_choices_running"] = ("Choices prefilling or decoding.", s.in_flight)
        g["moelab_cache_blocks_used"] = ("Paged-cache blocks holding tokens.", lambda: self.pool.used)
        g["moelab_cache_blocks_reserved"] = ("Paged-cache blocks booked by admitted requests.",
                                             lambda: self.pool.reserved)
        g["moelab_cache_blocks_total"] = ("Paged-cache blocks in the pool.", lambda: self.pool.num_blocks)
        g["moelab_cache_usage_ratio"] = ("Fraction of the cache blocks holding tokens.",
                                         lambda: self.pool.used / self.pool.num_blocks)
        g["moelab_cache_tokens"] = ("Tokens held in the paged cache.", s.cached_tokens)

    # -- any thread -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="moelab-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: GenerationRequest) -> None:
        """Queue ``req`` (raises :class:`ApiError` 400 when it can never fit, 503 when busy or shutting down)."""
        if self._stopping:
            raise ApiError(503, "the server is shutting down; send the request to another replica")
        self.sched.enqueue(req)

    def cancel(self, req: GenerationRequest) -> None:
        """Stop ``req`` (its blocks are freed at the engine's next step)."""
        req.cancelled = True
        with self.sched.lock:
            self.sched.lock.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every accepted request, then end the thread (refusing new requests meanwhile)."""
        with self.sched.lock:
            self._stopping = True
            self.sched.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def busy(self) -> bool:
        return self.sched.has_work()

    # -- engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.sched.lock:
                while not self.sched.has_work() and not self._stopping:
                    self.sched.lock.wait()
                if self._stopping and not self.sched.has_work():
                    return
            try:
                self.step()
            except Exception as e:   # noqa: BLE001 (a failed forward must not end the server)
                log.exception("a model step failed; failing the requests in flight")
                for req in self.sched.fail_all():
                    req.sink(Failure(f"the model failed while serving this request: {e}"))

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: sweep, admit, prefill up to one chunk's worth of tokens, one batched decode step."""
        self.sched.sweep()
        self.sched.admit()
        fed = 0
        while self.sched.prefilling and fed < self.prefill_chunk:
            fed += self._prefill_chunk(self.sched.prefilling[0])
        self.sched.sweep()
        if self.sched.running:
            self._decode_step(self.sched.running)

    def _prefill_chunk(self, g: PromptGroup) -> int:
        first, req = g.choices[0], g.req
        start = g.prefilled
        end = min(len(g.prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk)
        ids_1T = torch.tensor([g.prompt[start:end]], device=self.model.device)
        view = PagedBatch(self.pool, [first.seq], end - start)
        score_prompt = req.echo and req.logprobs is not None
        logits_1TV = self.model(ids_1T, cache=view, logits_to_keep=0 if score_prompt else 1).logits
        view.commit()
        g.prefilled = end
        if score_prompt:
            targets = g.prompt[start + 1:end + 1]
            g.prompt_logprobs += self._logprobs(logits_1TV[0, :len(targets)], targets, req.logprobs)
        self.metrics.count_tokens(prompt=end - start)
        if end < len(g.prompt):
            return end - start
        if score_prompt:
            req.sink(PromptLogprobs(g.prompt_index, [TokenLogprob(g.prompt[0], None)] + g.prompt_logprobs))
        for c in g.choices[1:]:                       # n > 1: the other choices start from a copy of the prompt
            c.seq.grow(self.pool, len(g.prompt))
            self.pool.copy_blocks(first.seq.blocks, c.seq.blocks)
            c.seq.length = len(g.prompt)
        self.sched.start_decoding(g)
        last_1V = logits_1TV[:, -1]
        for c in g.choices:
            if req.max_tokens == 0:
                self._emit(c, "", [], "length", None)
            else:
                self._accept(c, last_1V)
        return end - start

    def _decode_step(self, running: list[Choice]) -> None:
        ids_B1 = torch.tensor([[c.generated[-1]] for c in running], device=self.model.device)
        view = PagedBatch(self.pool, [c.seq for c in running], 1)
        logits_BV = self.model(ids_B1, attention_mask=view.padding(), position_ids=view.positions(),
                               cache=view).logits[:, -1]
        view.commit()
        for i, c in enumerate(running):
            self._accept(c, logits_BV[i:i + 1])

    def _accept(self, c: Choice, logits_1V: torch.Tensor) -> None:
        """Draw ``c``'s next token from ``logits_1V`` ``[1, V]``, send it and decide whether ``c`` is done."""
        req = c.req
        if not bool(torch.isfinite(logits_1V).all()):
            raise RuntimeError("the model produced non-finite logits (corrupt weights or overflow; try float32)")
        token = int(sample_next(logits_1V, req.sampling, c.generator)[0])
        lps = None if req.logprobs is None else self._logprobs(logits_1V, [token], req.logprobs)
        c.generated.append(token)
        now = time.perf_counter()
        if len(c.generated) == 1:
            self.metrics.observe("ttft", now - req.arrived)
        else:
            self.metrics.observe("itl", now - c.last_token_at)
        c.last_token_at = now
        self.metrics.count_tokens(generated=1)
        finish = None
        if self.eos is not None and token == self.eos:
            text, finish = c.text.flush(), "stop"
        else:
            text, stopped = c.text.push(token)
            if stopped:
                finish = "stop"
            elif len(c.generated) >= req.max_tokens:
                text, finish = text + c.text.flush(), "length"
        self._emit(c, text, [token], finish, lps)

    def _emit(self, c: Choice, text: str, tokens: list[int], finish: str | None, lps) -> None:
        if finish is not None:
            self.sched.finish(c)
            self.metrics.observe("latency", time.perf_counter() - c.req.arrived)
        c.req.sink(Delta(c.index, text, tokens, finish, lps))

    @staticmethod
    def _logprobs(logits_NV: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
        """Log-probabilities of ``targets`` (one per row of ``logits_NV`` ``[N, V]``) and each row's ``top`` best."""
        lp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
        chosen = lp_NV.gather(1, torch.tensor(targets, device=lp_NV.device)[:, None])[:, 0].tolist()
        best_v, best_i = lp_NV.topk(top, dim=-1) if top > 0 else (None, None)
        out = []
        for r, t in enumerate(targets):
            alts = [] if best_v is None else list(zip(best_i[r].tolist(), best_v[r].tolist(), strict=True))
            out.append(TokenLogprob(t, chosen[r], alts))
        return out


__all__ = ["Engine"]
