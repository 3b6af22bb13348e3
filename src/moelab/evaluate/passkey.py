"""Passkey retrieval (Mohtashami & Jaggi 2023, the long-context check of YaRN and DeepSeek-V2 §3.1.4): a
random number hidden at a chosen depth in filler text of a chosen length; the model must say it back.

    result = run_passkey(model, tokenizer, lengths=[512, 1024], depths=[0, 0.5, 1], trials=5)
    result["accuracy"][i][j]        # length i, depth j

Prompt (tokens counted with the model's tokenizer; pieces encoded separately and joined):

    <start> There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important information there. [filler × a] The pass key is K. Remember
    it. K is the pass key. [filler × b] What is the pass key? The pass key is

``a / (a + b)`` is the depth (0: right after the instruction, 1: just before the question) and the total
is the target length (within one filler sentence). The answer is right when the first number the model
writes (greedy) is K; K has 5 digits, drawn per trial from a seeded generator.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from moelab.errors import MoelabError
from moelab.evaluate.lm import context_length, encode, generate_ids, separator_id

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there. ")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"
_NUMBER = re.compile(r"\d+")


def needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_prompt(model, tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt of about ``length`` tokens with the key at ``depth`` ∈ [0, 1]."""
    if not 0 <= depth <= 1:
        raise MoelabError(f"depth must be in [0, 1] (got {depth})")
    intro, filler, key_ids, question = (encode(tokenizer, t) for t in (INTRO, FILLER, needle(key), QUESTION))
    fixed = 1 + len(intro) + len(key_ids) + len(question)
    units = max(0, round((length - fixed) / len(filler)))
    if units == 0 and length < fixed:
        raise MoelabError(f"a passkey prompt needs at least {fixed} tokens (got a length of {length})")
    before = round(depth * units)
    return ([separator_id(model, tokenizer), *intro, *filler * before, *key_ids, *filler * (units - before),
             *question])


def answered(text: str, key: int) -> bool:
    m = _NUMBER.search(text)
    return m is not None and m.group() == str(key)


def run_passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int = 5, seed: int = 0,
                max_new_tokens: int = 8, on_cell: Callable[[int], None] | None = None) -> dict:
    """Accuracy over the grid ``lengths × depths`` (``trials`` keys per cell); lengths beyond the model's
    context are skipped and listed."""
    if trials < 1:
        raise MoelabError(f"trials must be >= 1 (got {trials})")
    ctx = context_length(model)
    usable = [n for n in lengths if n + max_new_tokens <= ctx]
    skipped = [n for n in lengths if n not in usable]
    if not usable:
        raise MoelabError(f"every length exceeds the model's context of {ctx} tokens; choose shorter --lengths "
                          "(or extend the context first: moelab extend-context)")
    rng = random.Random(seed)
    accuracy, examples = [], []
    was_training = model.training
    model.eval()
    try:
        for n in usable:
            row = []
            for d in depths:
                keys = [rng.randrange(10_000, 100_000) for _ in range(trials)]
                prompts = [passkey_prompt(model, tokenizer, n, d, k) for k in keys]
                outs = generate_ids(model, tokenizer, prompts, max_new_tokens)
                texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
                hits = [answered(t, k) for t, k in zip(texts, keys, strict=True)]
                row.append(sum(hits) / trials)
                examples.append({"length": n, "depth": d, "tokens": len(prompts[0]), "key": keys[0],
                                 "answer": texts[0].strip()[:40], "hit": hits[0]})
                if on_cell is not None:
                    on_cell(1)
            accuracy.append(row)
    finally:
        model.train(was_training)
    return {"lengths": usable, "depths": list(depths), "trials": trials, "accuracy": accuracy,
            "mean_accuracy": sum(map(sum, accuracy)) / (len(usable) * len(depths)), "skipped_lengths": skipped,
            "context": ctx, "examples": examples}


def heatmap(result: dict, path, title: str = "passkey retrieval"):
    """Accuracy by context length (rows) × depth (columns) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moelab.common.figures import save_figure

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["depths"]), 1.0 + 0.6 * len(result["lengths"])))
    im = ax.imshow(result["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_xlabel("depth of the key (0 = start, 1 = end)")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(result["accuracy"]):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy")
    return save_figure(fig, path)


__all__ = ["FILLER", "answered", "heatmap", "needle", "passkey_prompt", "run_passkey"]
