"""Decode steps over a static cache: the same shapes at every step, so a step can be compiled once and
captured as one CUDA graph.

``generate(decode=...)`` picks how the decode steps run (:data:`DECODE_MODES`):

* ``dynamic`` — the growable :class:`~moelab.model.cache.DecodingCache`, eager: attention against exactly the
  cached tokens, one sync per step for the finiteness check (the reference path).
* ``static`` — a :class:`~moelab.model.cache.StaticCache` for prompt + new tokens, eager steps that write in
  place at a slot held on the device and attend against the whole buffer under a length mask.
* ``graph`` — ``static`` with the step captured as one CUDA graph (CUDA only): one launch per token.
* ``compile`` — ``static`` with each decoder layer run through ``torch.compile`` (one compilation serves all
  layers of a kind; tens of seconds up front, fused elementwise kernels afterwards), captured as a CUDA graph
  on CUDA.
* ``auto`` (default) — ``graph`` on CUDA, ``dynamic`` elsewhere.

A step that cannot be captured (an op in it reads a value back to the host, e.g. the routed experts' grouped
kernels counting rows per expert) or a model with routing observers or hooks (a replayed graph would skip
their Python) runs eagerly instead; the reason is logged once and returned in ``generate``'s report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from moelab.errors import MoelabError
from moelab.model.cache import StaticCache
from moelab.model.kernel_choice import log_choice
from moelab.model.transformer import DecoderLayer, DeepSeekForCausalLM

log = logging.getLogger("moelab.infer")

#: Values of ``generate(decode=...)`` and ``moelab generate --decode``.
DECODE_MODES = ("auto", "dynamic", "static", "graph", "compile")


def resolve_mode(mode: str, device: torch.device) -> str:
    """The decode mode that runs for a request on ``device`` (``auto``: ``graph`` on CUDA, else ``dynamic``)."""
    if mode not in DECODE_MODES:
        raise MoelabError(f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "dynamic"
    if mode == "graph" and device.type != "cuda":
        raise MoelabError(f"decode mode 'graph' captures CUDA graphs; the model is on {device.type} "
                          f"(use 'static', or 'compile' for a compiled step without a graph)")
    return mode


def _run_layer(layer: DecoderLayer, x, cos, sin, mask, slot):
    return layer(x, cos, sin, mask, slot)


_compiled: dict[str | Callable, Callable] = {}


def compiled_layer(backend: str | Callable = "inductor") -> Callable:
    """``_run_layer`` through ``torch.compile``, made once per process and backend: its code is shared by every
    layer, so one compilation serves all layers of a kind (dense, MoE) and later calls of the same shapes.

    The experts' one-time kernel-choice log line would break the traced graph in two (dynamo does not trace
    ``logging``); while tracing it is skipped (the eager prefill has logged it already)."""
    if backend not in _compiled:
        _compiled[backend] = torch.compile(_run_layer, backend=backend)
    fn = _compiled[backend]

    cfg = torch._dynamo.config
    key = "ignore_logging_functions" if hasattr(cfg, "ignore_logging_functions") else "ignore_logger_methods"

    def run(*args):
        with cfg.patch(**{key: {log_choice}}):
            return fn(*args)

    return run


def _python_in_forward(model: torch.nn.Module) -> str | None:
    """Why a replayed graph would change what the model does (Python run inside its forward), or None."""
    for name, m in model.named_modules():
        if getattr(m, "routing_observers", None):
            return f"{name} has routing observers"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name or 'the model'} has forward hooks"
    return None


class StaticDecoder:
    """Runs decode steps of ``model`` over ``cache`` after its prefill: ``decoder(tokens [B]) -> logits [B, V]``.

    ``padding`` ``[B, T]`` (1 = token, 0 = left padding) is the prompt's mask, or None. The step's inputs live
    in fixed device tensors (the fed tokens, each row's RoPE position, the cache slot); the step writes the slot,
    attends under ``key_mask & (slot index <= position)`` and advances the positions, all on the device.
    With ``compile`` each layer runs through ``torch.compile`` (``backend``; if tracing fails, eagerly, with the
    reason in :attr:`not_compiled`); with ``graph`` the step is captured
    once (after warm-up runs that must not sync with the host) and every call replays it; the returned logits
    are then a buffer the next call overwrites.
    """

    def __init__(self, model: DeepSeekForCausalLM, cache: StaticCache, padding: torch.Tensor | None, *,
                 compile: bool = False, graph: bool = False, backend: str | Callable = "inductor"):
        self.model, self.cache = model, cache
        B, T, L, dev = cache.batch, cache.seq_len, cache.capacity, model.device
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.key_mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        if padding is None:
            self.positions = torch.full((B, 1), T, dtype=torch.long, device=dev)
        else:
            padding = padding.to(dev)
            self.key_mask[:, :T] = padding[:, :T].to(torch.bool)
            self.positions = padding.long().sum(-1, keepdim=True)            # the next token's RoPE position
        self.slots = cache.step_slots()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.not_graphed: str | None = None                                   # why a requested graph is not used
        python = _python_in_forward(model) if (compile or graph) else None
        if python is not None:
            self.not_graphed = f"{python}: the step runs eagerly"
            compile = graph = False
        self.not_compiled: str | None = None                                  # why a requested compile is not used
        self.run_layer = None
        self.logits: torch.Tensor | None = None
        if compile:
            self._compile(backend)
        if graph:
            self._capture()
        if self.not_graphed is not None:
            log.info("decode step not captured as a CUDA graph: %s", self.not_graphed)

    def _step(self) -> torch.Tensor:
        mask = (self.key_mask & (self.cache.slots <= self.cache.position))[:, None, None, :]   # [B, 1, 1, L]
        logits = self.model.decode_step(self.tokens, self.positions, mask, self.slots, self.run_layer)
        self.positions.add_(1)
        self.cache.position.add_(1)
        return logits

    def _saved_state(self):
        """A function that puts back the state a step advances (positions, cache slot) as it is now. A warm-up
        step's cache write lands in the slot the first real step overwrites before anything reads it."""
        saved = self.positions.clone(), self.cache.position.clone()

        def restore():
            self.positions.copy_(saved[0])
            self.cache.position.copy_(saved[1])

        return restore

    def _compile(self, backend: str | Callable) -> None:
        """Compile now (one step, then the state put back), not in the first timed step. A model dynamo cannot
        trace (e.g. an op whose shape rules refuse inputs its eager kernel takes: ``grouped_mm`` in fp32 on the
        CPU) runs eagerly instead."""
        self.run_layer = compiled_layer(backend)
        restore = self._saved_state()
        try:
            self._step()
        except torch._dynamo.exc.TorchDynamoException as e:
            self.run_layer = None
            cause = getattr(e, "inner_exception", None) or e.__cause__ or e     # the backend's own error
            first = (str(cause).strip().splitlines() or [""])[0]
            self.not_compiled = f"torch.compile failed ({type(e).__name__}: {type(cause).__name__}: {first})"
            log.warning("decode step not compiled, running eagerly: %s", self.not_compiled)
        finally:
            restore()

    def _capture(self, warmup: int = 2) -> None:
        """Warm up on a side stream (compiles, cuBLAS workspaces; the last run refuses host syncs), capture one
        step, and restore the state the warm-up advanced."""
        restore = self._saved_state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        before = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.stream(stream):
                for i in range(warmup):
                    if i == warmup - 1:
                        torch.cuda.set_sync_debug_mode("error")
                    self._step()
                    restore()
        except RuntimeError as e:      # also dynamo's errors, out of memory, ...: say which
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.not_graphed = (f"an op in the step synchronises with the host ({first})" if "synchroniz" in first
                                else f"the warm-up step failed ({type(e).__name__}: {first})")
        finally:
            torch.cuda.set_sync_debug_mode(before)
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        if self.not_graphed is not None:
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
        except RuntimeError as e:
            self.not_graphed = f"capture failed ({str(e).splitlines()[0]})"
            self.logits = None
            torch.cuda.synchronize()
            return
        finally:
            restore()
        self.graph = graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[B]`` (one per row) and return the logits ``[B, V]`` of the next position."""
        self.cache.check_room(1)
        self.tokens.copy_(tokens[:, None])
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        self.cache.stepped()
        return logits
