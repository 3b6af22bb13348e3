"""Autoregressive generation with the decoding cache.

The prompt is prefilled (optionally in chunks, bounding activation memory for long prompts), then
one token per step attends against the cache — for MLA only the latent and the RoPE key per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moelab.errors import CheckpointError, MoelabError
from moelab.infer.sampling import SamplingConfig, sample_next
from moelab.model.transformer import DeepSeekForCausalLM


@torch.inference_mode()
def generate(model: DeepSeekForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
             sampling: SamplingConfig | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, prefill_chunk: int = 0,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` ``[B, T]``; returns ``[B, T + n]``.

    ``attention_mask`` ``[B, T]`` (1 = token, 0 = left padding) allows prompts of different lengths.
    Rows that produced ``eos_token_id`` keep emitting it; generation stops when all rows have.
    ``on_token`` is called with each new column ``[B]`` (for streaming).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MoelabError(f"input_ids must be [batch, tokens] with at least one token (got {tuple(input_ids.shape)})")
    if max_new_tokens < 0:
        raise MoelabError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise MoelabError(f"token ids must lie in [0, {vocab}) for this model "
                          f"(got {int(input_ids.min())}..{int(input_ids.max())})")
    sampling = sampling or SamplingConfig(greedy=True)
    gen = None
    if sampling.seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    model.eval()
    cache = model.new_cache()
    B, T = input_ids.shape
    mask = attention_mask
    chunk = prefill_chunk if prefill_chunk > 0 else T
    logits = None
    for start in range(0, T, chunk):
        part = input_ids[:, start:start + chunk]
        m = None if mask is None else mask[:, :start + part.shape[1]]
        logits = model(part, attention_mask=m, cache=cache, logits_to_keep=1).logits[:, -1]
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        _check_finite(model, logits, step)
        nxt = sample_next(logits, sampling, gen)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if (eos_token_id is not None and bool(done.all())) or step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
        logits = model(nxt[:, None], attention_mask=mask, cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


def _check_finite(model: DeepSeekForCausalLM, logits: torch.Tensor, step: int) -> None:
    """Refuse non-finite logits ``[B, V]`` (a NaN/inf in the weights or an overflow) before a token is drawn.

    One reduction per step; the weights are searched only once something is wrong.
    """
    if bool(torch.isfinite(logits).all()):
        return
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"the model produced non-finite logits at step {step + 1}; the checkpoint's weights may "
                              f"be corrupt (non-finite values in {', '.join(bad[:3])}{more})")
    raise CheckpointError(f"the model produced non-finite logits at step {step + 1} although its weights are finite "
                          f"(numerical overflow in {str(model.dtype).removeprefix('torch.')}?); try float32 weights")
