"""Autoregressive generation with the decoding cache.

The prompt is prefilled (optionally in chunks, bounding activation memory for long prompts), then
one token per step attends against the cache — for MLA only the latent and the RoPE key per token.
How the steps run (growable cache, static cache, compiled, one CUDA graph per step) is ``decode``
(:mod:`moelab.infer.static`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from moelab.errors import CheckpointError, MoelabError
from moelab.infer.sampling import SamplingConfig, sample_next
from moelab.infer.static import StaticDecoder, resolve_mode
from moelab.model.transformer import DeepSeekForCausalLM


@torch.inference_mode()
def generate(model: DeepSeekForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
             sampling: SamplingConfig | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, prefill_chunk: int = 0,
             on_token: Callable[[torch.Tensor], None] | None = None, decode: str = "auto",
             report: dict | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` ``[B, T]``; returns ``[B, T + n]``.

    ``attention_mask`` ``[B, T]`` (1 = token, 0 = left padding) allows prompts of different lengths.
    Rows that produced ``eos_token_id`` keep emitting it; generation stops when all rows have.
    ``on_token`` is called with each new column ``[B]`` (for streaming).

    ``decode`` is ``auto`` (``graph`` on CUDA, else ``dynamic``), ``dynamic``, ``static``, ``graph`` or
    ``compile`` (:mod:`moelab.infer.static`); all give the same tokens up to floating-point rounding. The
    static modes allocate the cache for ``T + max_new_tokens - 1`` tokens, read nothing back to the host per
    step unless ``eos_token_id`` is set (then one flag per step), and check that the logits are finite at those
    reads and at the end rather than before each draw. ``report``, if given, receives ``mode`` (the mode
    that ran), ``graph`` (whether steps replayed a CUDA graph), ``not_graphed`` (why not, when one was asked
    for), ``not_compiled`` (why ``compile`` runs eagerly, if it does) and ``setup_s`` (seconds spent compiling /
    capturing after the prefill).

    ``inputs_embeds`` ``[B, T, H]``, if given, is what the prompt prefill feeds instead of the embeddings of
    ``input_ids`` (a vision-language model's prompt with its image features written in); the new tokens are
    embedded as usual.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MoelabError(f"input_ids must be [batch, tokens] with at least one token (got {tuple(input_ids.shape)})")
    if max_new_tokens < 0:
        raise MoelabError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if inputs_embeds is not None and tuple(inputs_embeds.shape[:2]) != tuple(input_ids.shape):
        raise MoelabError(f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids "
                          f"{tuple(input_ids.shape)} in batch and length")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise MoelabError(f"token ids must lie in [0, {vocab}) for this model "
                          f"(got {int(input_ids.min())}..{int(input_ids.max())})")
    mode = resolve_mode(decode, model.device)
    sampling = sampling or SamplingConfig(greedy=True)
    gen = None
    if sampling.seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    model.eval()
    B, T = input_ids.shape
    static = mode != "dynamic"
    # the last new token is never fed back: prompt + max_new - 1 slots hold everything the steps attend to
    cache = model.new_static_cache(B, T + max(max_new_tokens - 1, 0)) if static else model.new_cache()
    mask = attention_mask
    chunk = prefill_chunk if prefill_chunk > 0 else T
    logits = None
    for start in range(0, T, chunk):
        part = input_ids[:, start:start + chunk]
        m = None if mask is None else mask[:, :start + part.shape[1]]
        if inputs_embeds is None:
            logits = model(part, attention_mask=m, cache=cache, logits_to_keep=1).logits[:, -1]
        else:
            logits = model(None, attention_mask=m, cache=cache, logits_to_keep=1,
                           inputs_embeds=inputs_embeds[:, start:start + chunk]).logits[:, -1]
    decoder = None
    t0 = time.perf_counter()
    if static and max_new_tokens > 1:
        cuda = model.device.type == "cuda"
        decoder = StaticDecoder(model, cache, mask, compile=mode == "compile", graph=cuda and mode != "static")
    if report is not None:
        report.update(mode=mode, graph=decoder is not None and decoder.graph is not None,
                      not_graphed=None if decoder is None else decoder.not_graphed,
                      not_compiled=None if decoder is None else decoder.not_compiled,
                      setup_s=time.perf_counter() - t0)
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=input_ids.device)   # static modes: checked later
    for step in range(max_new_tokens):
        if static:
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(logits).all(), step, first_bad)
        else:
            _check_finite(model, logits, step)
        nxt = sample_next(logits, sampling, gen)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if step == max_new_tokens - 1:
            break
        if eos_token_id is not None and bool(done.all()):
            break
        if static and eos_token_id is not None:
            _check_deferred(model, first_bad)           # the device is idle after the read above: no extra wait
        if decoder is not None:
            logits = decoder(nxt)
        else:
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
            logits = model(nxt[:, None], attention_mask=mask, cache=cache).logits[:, -1]
    if static:
        _check_deferred(model, first_bad)
    return torch.cat(out, dim=1)


def _check_deferred(model: DeepSeekForCausalLM, first_bad: torch.Tensor) -> None:
    """Raise for the first step whose logits were not finite (a device scalar, -1 when none was)."""
    step = int(first_bad)
    if step >= 0:
        _raise_nonfinite(model, step)


def _check_finite(model: DeepSeekForCausalLM, logits: torch.Tensor, step: int) -> None:
    """Refuse non-finite logits ``[B, V]`` (a NaN/inf in the weights or an overflow) before a token is drawn.

    One reduction per step; the weights are searched only once something is wrong.
    """
    if not bool(torch.isfinite(logits).all()):
        _raise_nonfinite(model, step)


def _raise_nonfinite(model: DeepSeekForCausalLM, step: int) -> None:
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"the model produced non-finite logits at step {step + 1}; the checkpoint's weights may "
                              f"be corrupt (non-finite values in {', '.join(bad[:3])}{more})")
    raise CheckpointError(f"the model produced non-finite logits at step {step + 1} although its weights are finite "
                          f"(numerical overflow in {str(model.dtype).removeprefix('torch.')}?); try float32 weights")
