"""Single-line infilling exact match (the FIM evaluation of Bavarian et al. 2022 / Fried et al. 2022, as
DeepSeek-Coder reports it): one line of a program is removed, the model sees the code before and after it
in the PSM format and writes the middle; the first line it writes must equal the removed line.

    tasks = humaneval_line_tasks(load_problems())           # every non-blank line of every canonical solution
    tasks = file_line_tasks("heldout.jsonl", per_file=4)    # lines of held-out source files
    result = run_infill(model, tokenizer, tasks)            # {"exact_match": 0.31, "n": 1033, ...}

Prompt: the model's start token, then ``<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>`` with the prefix
cut from the left and the suffix from the right to fit the context (¾ of the budget for the prefix);
greedy decoding until EOS or a newline after some text. Exact match compares the first generated line with
the removed line, trailing whitespace ignored (indentation counts).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.data.fim import encode_plain_many, sentinel_ids
from moelab.data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE
from moelab.errors import DataError
from moelab.evaluate.lm import context_length, generate_texts, left_pad, model_device, separator_id
from moelab.lm.nll import token_nll


@dataclass(frozen=True)
class InfillTask:
    name: str          # "HumanEval/3:2" (problem, line) or "path:line"
    prefix: str        # everything before the line (ends with a newline)
    suffix: str        # everything after the line's newline
    target: str        # the line, without its newline


def line_tasks(name: str, code: str, lines: list[int] | None = None) -> list[InfillTask]:
    """A task per non-blank line of ``code`` (or per index in ``lines``)."""
    rows = code.splitlines(keepends=True)
    picks = lines if lines is not None else [i for i, r in enumerate(rows) if r.strip()]
    return [InfillTask(f"{name}:{i}", "".join(rows[:i]), "".join(rows[i + 1:]), rows[i].rstrip("\r\n"))
            for i in picks]


def humaneval_line_tasks(problems: dict[str, dict], limit: int | None = None) -> list[InfillTask]:
    """HumanEval single-line infilling: each non-blank line of each canonical solution, masked in turn."""
    tasks = []
    for t, p in problems.items():
        prompt_lines = len(p["prompt"].splitlines(keepends=True))
        code = p["prompt"] + p["canonical_solution"]
        body = [i for i, r in enumerate(code.splitlines(keepends=True)) if i >= prompt_lines and r.strip()]
        tasks += line_tasks(t, code, body)
    return tasks[:limit] if limit else tasks


def file_line_tasks(path: str | Path, per_file: int = 4, seed: int = 0, limit: int | None = None) -> list[InfillTask]:
    """``per_file`` random non-blank lines of each file of a code corpus (``moelab data code`` JSON Lines)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; give a JSON Lines code corpus (`moelab data code ... --out FILE`)")
    rng = random.Random(seed)
    tasks: list[InfillTask] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, name = row["text"], row.get("path", f"{p.name}:{n}")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{p}:{n}: not a code-corpus line (a JSON object with 'text')") from None
            candidates = [i for i, r in enumerate(text.splitlines()) if r.strip()]
            picks = sorted(rng.sample(candidates, min(per_file, len(candidates))))
            tasks += line_tasks(name, text, picks)
            if limit and len(tasks) >= limit:
                return tasks[:limit]
    if not tasks:
        raise DataError(f"{p}: no lines to infill")
    return tasks


def prompt_ids(tokenizer, task: InfillTask, start: int, budget: int) -> list[int]:
    """``[start, BEGIN, prefix…, HOLE, suffix…, END]`` within ``budget`` tokens (prefix cut on the left,
    suffix on the right)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    ids = sentinel_ids(backend)
    pre, suf = encode_plain_many(backend, [task.prefix, task.suffix])
    room = max(budget - 4, 2)
    n_suf = min(len(suf), max(room // 4, room - len(pre)))
    n_pre = min(len(pre), room - n_suf)
    return [start, ids[FIM_BEGIN], *pre[len(pre) - n_pre:], ids[FIM_HOLE], *suf[:n_suf], ids[FIM_END]]


def first_line(middle: str) -> str:
    return middle.split("\n", 1)[0].rstrip()


def run_infill(model, tokenizer, tasks: list[InfillTask], max_new_tokens: int = 48, batch_size: int = 8,
               on_batch: Callable[[int], None] | None = None) -> dict:
    """Greedy infilling of every task; exact match of the first generated line (module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    sentinel_ids(backend)                     # a clear error for a model without FIM sentinels, before any work
    budget = context_length(model) - max_new_tokens
    start = separator_id(model, tokenizer)
    prompts = [prompt_ids(tokenizer, t, start, budget) for t in tasks]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch=on_batch, strip=False)
    preds = [first_line(t) for t in texts]
    hits = [p == t.target.rstrip() for p, t in zip(preds, tasks, strict=True)]
    return {"exact_match": sum(hits) / max(len(hits), 1), "n": len(hits), "hits": sum(hits),
            "examples": [{"task": t.name, "target": t.target, "prediction": p, "hit": h}
                         for t, p, h in list(zip(tasks, preds, hits, strict=True))[:20]]}


@torch.no_grad()
def infill_nll(model, tokenizer, tasks: list[InfillTask], batch_size: int = 8) -> dict:
    """The model's NLL (nats/token) of each removed line plus its newline, given the PSM prompt — the
    FIM loss, which shows infilling ability before exact matches appear."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    sentinel_ids(backend)
    targets = encode_plain_many(backend, [t.target + "\n" for t in tasks])
    budget = context_length(model) - max(len(x) for x in targets)
    start = separator_id(model, tokenizer)
    seqs = [(prompt_ids(tokenizer, t, start, budget), tgt) for t, tgt in zip(tasks, targets, strict=True)]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    dev = model_device(model)
    try:
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            rows = [p + t for p, t in chunk]
            ids, mask = left_pad(rows, 0)
            labels = torch.full_like(ids, -100)
            for i, (_, t) in enumerate(chunk):
                labels[i, ids.shape[1] - len(t):] = torch.tensor(t)
            logits = model(ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1]
            nll, n = token_nll(logits, labels[:, 1:].to(dev))
            total, count = total + nll, count + n
    finally:
        model.train(was_training)
    return {"infill_nll": total / max(count, 1), "tokens": count, "n": len(tasks)}


__all__ = ["InfillTask", "file_line_tasks", "first_line", "humaneval_line_tasks", "infill_nll", "line_tasks",
           "prompt_ids", "run_infill"]
