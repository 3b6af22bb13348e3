"""Completions of HumanEval prompts by a model (a moelab checkpoint or any transformers causal LM): the
prompt as plain code after the model's start token, greedy for pass@1 or ``n`` samples per problem at a
temperature for pass@k, each cut at the first stop sequence (:data:`~moelab.evaluate.humaneval.STOPS`).

    samples = generate_completions(model, tokenizer, problems, n=1)           # [(task_id, completion)]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moelab.evaluate.humaneval import truncate
from moelab.evaluate.lm import encode, generate_ids, is_moelab, left_pad, model_device, separator_id
from moelab.infer.sampling import SamplingConfig


def prompt_ids(model, tokenizer, prompt: str) -> list[int]:
    return [separator_id(model, tokenizer), *encode(tokenizer, prompt)]


@torch.inference_mode()
def _sample_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                top_p: float, seed: int) -> list[list[int]]:
    """Sampled continuations of one batch (each cut at the first EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos if eos is not None else 0
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(model_device(model)), mask.to(model_device(model))
    if is_moelab(model):
        from moelab.infer.generate import generate

        out = generate(model, ids, max_new_tokens, SamplingConfig(temperature=temperature, top_p=top_p, seed=seed),
                       eos_token_id=eos, attention_mask=mask)
    else:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=None, pad_token_id=pad, eos_token_id=eos)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos)] if eos is not None and eos in row else row)
    return rows


def generate_completions(model, tokenizer, problems: dict[str, dict], n: int = 1, temperature: float = 0.0,
                         top_p: float = 0.95, max_new_tokens: int = 384, batch_size: int = 8, seed: int = 0,
                         on_batch: Callable[[int], None] | None = None) -> list[tuple[str, str]]:
    """``n`` completions per problem (greedy when ``temperature`` is 0, which needs ``n = 1``)."""
    if temperature == 0 and n != 1:
        raise ValueError("greedy decoding gives one completion per problem; set a temperature for n > 1")
    jobs = [(t, prompt_ids(model, tokenizer, p["prompt"])) for t, p in problems.items() for _ in range(n)]
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][1]))
    texts: list[str] = [""] * len(jobs)
    was_training = model.training
    model.eval()
    try:
        for b, s in enumerate(range(0, len(order), batch_size)):
            chunk = order[s:s + batch_size]
            prompts = [jobs[i][1] for i in chunk]
            if temperature == 0:
                outs = generate_ids(model, tokenizer, prompts, max_new_tokens)
            else:
                outs = _sample_ids(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed + b)
            for i, row in zip(chunk, outs, strict=True):
                texts[i] = truncate(tokenizer.decode(row, skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    return [(t, text) for (t, _), text in zip(jobs, texts, strict=True)]


__all__ = ["generate_completions", "prompt_ids"]
