"""Exact-match generation tasks: render each prompt with the chat template, decode greedily in
left-padded batches with the latent cache, compare the answer with the reference.

    rows = [{"prompt": "Calculate 5 - 3.", "completion": "2"}, ...]
    score_exact_match(model, tokenizer, rows)   # {"accuracy": 0.62, "n": 200, "samples": [...]}

Shapes: a batch of B prompts is left-padded to ``[B, T_max]`` with an attention mask; generation stops
at EOS or ``max_new_tokens``. The answer is the decoded text up to the first EOS.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from moelab.common.progress import Bars
from moelab.data.sft import ChatFormat, to_messages
from moelab.data.tasks import exact_match
from moelab.errors import DataError
from moelab.infer.generate import generate


def score_exact_match(model, tokenizer: Tokenizer, rows: list[dict], template: str = "deepseek",
                      max_new_tokens: int = 16, batch_size: int = 32, progress: bool = False,
                      n_samples: int = 5) -> dict:
    """Greedy exact-match accuracy of ``model`` on prompt/completion (or chat) ``rows``."""
    if not rows:
        raise DataError("no examples to score")
    fmt = ChatFormat(tokenizer, template)
    prompts, answers = [], []
    for r in rows:
        msgs = to_messages(r)
        if msgs[-1]["role"] != "assistant":
            raise DataError("each example must end with the reference assistant answer")
        prompts.append(fmt.prompt_ids(msgs[:-1]))
        answers.append(msgs[-1]["content"])
    was_training = model.training
    correct, samples = 0, []
    bar = Bars(progress)
    with bar:
        task = bar.add_task("scoring", total=len(rows))
        for s in range(0, len(rows), batch_size):
            chunk = prompts[s:s + batch_size]
            T = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), T), fmt.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, T - len(p):] = torch.tensor(p)
                mask[i, T - len(p):] = 1
            out = generate(model, ids, max_new_tokens, eos_token_id=fmt.eos, attention_mask=mask)
            for i in range(len(chunk)):
                new = out[i, T:].tolist()
                if fmt.eos in new:
                    new = new[:new.index(fmt.eos)]
                pred = tokenizer.decode(new, skip_special_tokens=True)
                ok = exact_match(pred, answers[s + i])
                correct += ok
                if len(samples) < n_samples:
                    samples.append({"prompt": rows[s + i].get("prompt", ""), "answer": answers[s + i],
                                    "prediction": pred, "correct": bool(ok)})
            bar.advance(task, len(chunk))
    model.train(was_training)
    return {"accuracy": correct / len(rows), "correct": correct, "n": len(rows), "samples": samples}


__all__ = ["score_exact_match"]
