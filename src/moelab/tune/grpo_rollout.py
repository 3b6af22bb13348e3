"""GRPO's rollouts: G sampled completions of each prompt, laid out as training rows, and per-token
log-probabilities of a model on them.

Legend: P prompts, G completions each, R = P·G rows (prompt-major: the G samples of a prompt are
consecutive), T = seq_len, V vocabulary.

    roll = sample_completions(policy, prompts, G, sampling, max_new, eos, pad, seed, gen_batch)
    x_RT, y_RT = layout(prompts_R, roll.tokens, seq_len, pad)       # right-padded, targets shifted
    logp_RT = token_logps(logits_RTV, y_RT)                          # 0 where y == −100

A completion is the sampled tokens up to and including the first EOS (or all ``max_new`` tokens when the
model never ended: ``truncated``). Row r holds ``prompt + completion`` from position 0; ``y`` is −100 on
the prompt and the padding, so the loss mask is ``y != −100`` — the completion tokens and their EOS.
Generation runs in left-padded batches of ``gen_batch`` rows, batch c seeded from ``(seed, c)``: the
samples are a pure function of the weights, the prompts and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingConfig
from moelab.lm.padding import left_pad
from moelab.train.step import autocast_ctx

IGNORE = -100


@dataclass
class Rollout:
    tokens: list[list[int]]      # R completions (ids, EOS included when produced)
    truncated: list[bool]        # R: no EOS within max_new tokens


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of generation batch ``chunk`` of a sample batch seeded ``seed``."""
    return int(np.random.default_rng([seed, chunk, 0x524F4C4C]).integers(2**62))      # "ROLL"


@torch.inference_mode()
def sample_completions(policy, prompts: list[list[int]], group: int, sampling: SamplingConfig, max_new: int,
                       eos: int, pad: int, seed: int, gen_batch: int = 0) -> Rollout:
    """``group`` sampled completions of each prompt (module docstring); the policy's mode is restored."""
    rows = [p for p in prompts for _ in range(group)]
    step = gen_batch if gen_batch > 0 else len(rows)
    device = next(policy.parameters()).device
    was_training = policy.training
    tokens, truncated = [], []
    try:
        for c, s in enumerate(range(0, len(rows), step)):
            ids, mask = left_pad(rows[s:s + step], pad)
            cfg = SamplingConfig(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                 seed=chunk_seed(seed, c))
            out = generate(policy, ids.to(device), max_new, cfg, eos_token_id=eos, attention_mask=mask.to(device))
            for row in out[:, ids.shape[1]:].tolist():
                ended = eos in row
                tokens.append(row[:row.index(eos) + 1] if ended else row)
                truncated.append(not ended)
    finally:
        policy.train(was_training)
    return Rollout(tokens, truncated)


def layout(prompts: list[list[int]], completions: list[list[int]], seq_len: int, pad: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` int64 ``[R, seq_len]``: prompt + completion from position 0, targets on the completion."""
    R = len(prompts)
    x = torch.full((R, seq_len), pad, dtype=torch.long)
    y = torch.full((R, seq_len), IGNORE, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        full = (list(p) + list(c))[:seq_len + 1]
        n = len(full) - 1
        x[r, :n] = torch.tensor(full[:-1], dtype=torch.long)
        y[r, len(p) - 1:n] = torch.tensor(full[len(p):], dtype=torch.long)
    return x, y


def token_logps(logits_RTV: torch.Tensor, y_RT: torch.Tensor) -> torch.Tensor:
    """``[R, T]``: log p(y_t | < t) at target positions, 0 elsewhere (at least fp32; fp64 stays fp64)."""
    dtype = torch.promote_types(logits_RTV.dtype, torch.float32)
    logp = torch.log_softmax(logits_RTV.to(dtype), dim=-1)
    mask = y_RT != IGNORE
    return logp.gather(-1, y_RT.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask


@torch.no_grad()
def model_token_logps(model, x_RT: torch.Tensor, y_RT: torch.Tensor, batch_size: int, dtype: str = "float32"
                      ) -> torch.Tensor:
    """``[R, T]`` fp32 token log-probabilities of ``model`` (the reference) on rows, ``batch_size`` at a time."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, x_RT.shape[0], batch_size):
        x, y = x_RT[s:s + batch_size].to(device), y_RT[s:s + batch_size].to(device)
        with autocast_ctx(dtype, device):
            logits = model(x).logits
        out.append(token_logps(logits, y).float().cpu())
    return torch.cat(out)


__all__ = ["IGNORE", "Rollout", "chunk_seed", "layout", "model_token_logps", "sample_completions", "token_logps"]
