"""On-policy preference pairs from a model's own samples, scored by a rule — DPO data with no external
labels (``moelab data prefs``).

    pairs, stats = build_preferences(model, tokenizer, rows, samples=8, temperature=1.0)
    # rows: prompt/completion tasks (``moelab data tasks``); pairs: {"prompt", "chosen", "rejected"}

For each prompt the model writes ``samples`` answers (temperature sampling, the chat template of
:mod:`moelab.data.chat`); an answer is correct when it matches the reference (:func:`moelab.data.tasks.
exact_match`). A prompt with at least one correct and one incorrect answer gives one pair: the first
correct answer is chosen, the first incorrect one rejected. Prompts the model always gets right or always
gets wrong give none (counted). An empty answer (the model ended at once) is wrong but never the rejected
answer: a preference file needs text on both sides (:func:`moelab.data.prefs.read_preferences`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from moelab.data.chat import ChatFormat, to_messages
from moelab.data.tasks import exact_match
from moelab.errors import DataError
from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingConfig
from moelab.lm.padding import left_pad


@dataclass
class PrefBuildStats:
    prompts: int = 0
    pairs: int = 0
    all_correct: int = 0
    all_wrong: int = 0
    samples: int = 0
    correct_samples: int = 0


def pair_from(prompt: str, answers: list[str], reference: str) -> dict | None:
    """One pair from a prompt's sampled answers (module docstring), or None."""
    good = [a for a in answers if exact_match(a, reference)]
    bad = [a for a in answers if a.strip() and not exact_match(a, reference)]
    if not good or not bad:
        return None
    return {"prompt": prompt, "chosen": good[0], "rejected": bad[0]}


@torch.inference_mode()
def sample_answers(model, tokenizer: Tokenizer, prompts: list[list[int]], samples: int, temperature: float,
                   top_p: float, max_new_tokens: int, seed: int, fmt: ChatFormat) -> list[list[str]]:
    """``samples`` decoded answers per prompt (one left-padded batch)."""
    ids, mask = left_pad([p for p in prompts for _ in range(samples)], fmt.pad)
    T = ids.shape[1]
    dev = next(model.parameters()).device
    out = generate(model, ids.to(dev), max_new_tokens, SamplingConfig(temperature=temperature, top_p=top_p, seed=seed),
                   eos_token_id=fmt.eos, attention_mask=mask.to(dev))
    texts = []
    for row in out[:, T:].tolist():
        row = row[:row.index(fmt.eos)] if fmt.eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def build_preferences(model, tokenizer: Tokenizer, rows: list[dict], samples: int = 8, temperature: float = 1.0,
                      top_p: float = 1.0, max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0,
                      template: str = "deepseek", on_batch: Callable[[int], None] | None = None
                      ) -> tuple[list[dict], PrefBuildStats]:
    """Pairs from ``rows`` (prompt/completion or chat ending with the reference answer)."""
    if samples < 2:
        raise DataError(f"a pair needs at least 2 samples per prompt (got {samples})")
    if temperature <= 0:
        raise DataError("sampling needs a temperature > 0 (greedy answers are all the same)")
    fmt = ChatFormat(tokenizer, template)
    stats, pairs = PrefBuildStats(), []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            msgs = [to_messages(r) for r in chunk]
            prompts = [fmt.prompt_ids(m[:-1]) for m in msgs]
            answers = sample_answers(model, tokenizer, prompts, samples, temperature, top_p, max_new_tokens,
                                     seed + s, fmt)
            for m, ans in zip(msgs, answers, strict=True):
                ref, prompt = m[-1]["content"], m[-2]["content"]
                ok = sum(exact_match(a, ref) for a in ans)
                stats.prompts += 1
                stats.samples += len(ans)
                stats.correct_samples += ok
                stats.all_correct += ok == len(ans)
                stats.all_wrong += ok == 0
                pair = pair_from(prompt, ans, ref)
                if pair is not None:
                    pairs.append(pair)
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    stats.pairs = len(pairs)
    return pairs, stats


__all__ = ["PrefBuildStats", "build_preferences", "pair_from", "sample_answers"]
