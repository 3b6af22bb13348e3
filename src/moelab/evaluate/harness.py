"""A small task harness: exact-match generation tasks and multiple choice by log-likelihood, for moelab
models and any ``transformers`` causal LM.

    rows = load_task("arithmetic", n=200, seed=1)              # or "gsm", or a JSONL file
    score_generation(model, tokenizer, rows)                     # {"accuracy": ..., "samples": [...]}
    score_multiple_choice(model, tokenizer, [{"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1}])

**Generation** is greedy, in left-padded batches. moelab models answer in the moelab chat template
(through :func:`moelab.evaluate.exact_match.score_exact_match`); transformers models through
``model.generate`` with the tokenizer's chat template when it has one. ``answer="exact"`` compares the
whole answer with the reference (:func:`moelab.data.tasks.exact_match`); ``answer="number"`` compares the
final number of the answer (:func:`extract_number`) with a numeric reference (chat models explain before
they answer). ``"auto"``: exact for moelab models, number for the others.

**Multiple choice**: each choice's score is the summed log-probability of its tokens given the context,
``sum_t log p(c_t | context, c_<t)``, optionally divided by its token count (``normalize="tokens"``) or
UTF-8 byte count (``"bytes"``); the prediction is the best-scoring choice. The context is encoded after
the model's start token (:func:`moelab.evaluate.lm.separator_id`); context and continuation are encoded
separately, so a continuation should carry its leading space (``" Paris"``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.common.progress import Bars
from moelab.data.tasks import exact_match
from moelab.errors import DataError, MoelabError
from moelab.evaluate.lm import (
    context_length,
    encode,
    forward_logits,
    generate_texts,
    is_moelab,
    model_device,
    separator_id,
)
from moelab.lm.nll import token_nll

NORMALIZE = ("none", "tokens", "bytes")
ANSWER_MODES = ("auto", "exact", "number")


# -- log-likelihood ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogLikelihood:
    """Score of one continuation: summed log-probability (nats), its tokens, and whether greedy decoding
    would produce it."""

    logprob: float
    tokens: int
    greedy: bool


@torch.inference_mode()
def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8) -> list[LogLikelihood]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` pair.

    Sequences are ``[start] + context + continuation`` token ids, right-padded in batches (causal
    attention never looks at the padding). A sequence longer than the model's context loses context
    tokens from the left. Shapes: a batch is ``[B, T]``; logits ``[B, T, V]``.
    """
    if batch_size < 1:
        raise MoelabError(f"batch_size must be >= 1 (got {batch_size})")
    start = separator_id(model, tokenizer)
    limit = context_length(model) + 1
    seqs: list[tuple[list[int], int]] = []  # (ids, number of continuation tokens)
    for ctx, cont in requests:
        c = encode(tokenizer, cont)
        if not c:
            raise DataError(f"the continuation {cont!r} encodes to no tokens; give a non-empty choice")
        ids = [start] + encode(tokenizer, ctx) + c
        if len(ids) > limit:
            if len(c) >= limit:
                raise DataError(f"a continuation of {len(c)} tokens does not fit the model's context")
            ids = ids[-limit:]
        seqs.append((ids, len(c)))
    dev = model_device(model)
    was_training = model.training
    model.eval()
    out: list[LogLikelihood] = []
    try:
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            T = max(len(ids) for ids, _ in chunk) - 1
            x_BT = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, (ids, _) in enumerate(chunk):
                x_BT[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            logits_BTV = forward_logits(model, x_BT.to(dev))
            for r, (ids, n) in enumerate(chunk):
                L = len(ids) - 1
                logits = logits_BTV[r, L - n:L]                           # [n, V]: predicts the continuation
                target = torch.tensor(ids[L - n + 1:], device=dev)
                nll, _ = token_nll(logits[None], target[None], torch.float64)   # fp32 per token, fp64 sum
                greedy = bool((logits.argmax(-1) == target).all())
                out.append(LogLikelihood(-nll, n, greedy))
    finally:
        model.train(was_training)
    return out


def _mc_context(row: dict) -> str:
    if "context" in row:
        return str(row["context"])
    q = row.get("question", row.get("prompt"))
    if not isinstance(q, str):
        raise DataError("a multiple-choice row needs 'context' or 'question' (a string)")
    return f"Question: {q}\nAnswer:"


def _mc_answer(row: dict) -> int:
    choices, ans = row["choices"], row.get("answer")
    if isinstance(ans, bool) or ans is None:
        raise DataError("a multiple-choice row needs 'answer': the index of the right choice or its text")
    if isinstance(ans, int):
        if not 0 <= ans < len(choices):
            raise DataError(f"answer index {ans} is outside the {len(choices)} choices")
        return ans
    if ans in choices:
        return choices.index(ans)
    raise DataError(f"answer {ans!r} is not one of the choices {choices}")


def score_multiple_choice(model, tokenizer, rows: list[dict], normalize: str = "none", batch_size: int = 8,
                          progress: bool = False, n_samples: int = 5) -> dict:
    """Accuracy of picking the choice with the highest (normalised) log-likelihood.

    Rows: ``{"question": str, "choices": [str, ...], "answer": index or choice text}``; the context is
    ``"Question: {question}\\nAnswer:"`` and each continuation ``" " + choice`` unless the row gives its own
    ``"context"`` (then the choices are used verbatim).
    """
    if normalize not in NORMALIZE:
        raise MoelabError(f"normalize must be one of {', '.join(NORMALIZE)} (got {normalize!r})")
    if not rows:
        raise DataError("no examples to score")
    requests, spans, answers = [], [], []
    for r in rows:
        if not isinstance(r.get("choices"), list) or len(r["choices"]) < 2 \
                or not all(isinstance(c, str) for c in r["choices"]):
            raise DataError("a multiple-choice row needs 'choices': a list of at least two strings")
        ctx = _mc_context(r)
        conts = list(r["choices"]) if "context" in r else [" " + c for c in r["choices"]]
        spans.append((len(requests), len(conts), conts))
        requests.extend((ctx, c) for c in conts)
        answers.append(_mc_answer(r))
    scores: list[LogLikelihood] = []
    with Bars(progress) as bar:
        task = bar.add_task("multiple choice", total=len(requests))
        for s in range(0, len(requests), batch_size):
            scores.extend(loglikelihood(model, tokenizer, requests[s:s + batch_size], batch_size))
            bar.advance(task, len(requests[s:s + batch_size]))
    correct, samples = 0, []
    for i, ((first, n, conts), ans) in enumerate(zip(spans, answers, strict=True)):
        vals = [choice_score(scores[first + k], conts[k], normalize) for k in range(n)]
        pred = max(range(n), key=lambda k: vals[k])
        correct += pred == ans
        if len(samples) < n_samples:
            samples.append({"context": _mc_context(rows[i]), "choices": rows[i]["choices"], "answer": ans,
                            "prediction": pred, "scores": vals, "correct": pred == ans})
    return {"accuracy": correct / len(rows), "correct": correct, "n": len(rows), "normalize": normalize,
            "samples": samples}


def choice_score(ll: LogLikelihood, continuation: str, normalize: str) -> float:
    if normalize == "tokens":
        return ll.logprob / ll.tokens
    if normalize == "bytes":
        return ll.logprob / max(len(continuation.encode("utf-8")), 1)
    return ll.logprob


# -- generation -------------------------------------------------------------------------------------

_NUM = r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?"
_FINAL = [re.compile(p, re.IGNORECASE) for p in (
    r"####\s*[$€£]?\s*(" + _NUM + ")",
    r"\\boxed\{\s*[$€£]?\s*(" + _NUM + r")",
    r"answer\s*(?:is|=|:)\s*\**\s*:?\s*[$€£]?\s*(" + _NUM + ")",
)]


def _to_float(s: str) -> float | None:
    s = s.replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The answer's final number: after ``####``, in ``\\boxed{}``, after "the answer is" (the last such
    phrase), else the last number in the text; None when there is none. Commas in 1,234 are dropped."""
    for pat in _FINAL:
        hits = pat.findall(text)
        if hits:
            return _to_float(hits[-1])
    nums = re.findall(_NUM, text)
    return _to_float(nums[-1]) if nums else None


def numbers_equal(a: float | None, b: float | None, rel_tol: float = 1e-4) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-6)


def answer_correct(prediction: str, reference: str, mode: str) -> bool:
    """``exact``: whole-answer exact match; ``number``: the final numbers agree (exact match when the
    reference is not a number)."""
    if mode == "number":
        ref = _to_float(reference.strip())
        if ref is not None:
            return numbers_equal(extract_number(prediction), ref)
    return exact_match(prediction, reference)


def score_generation(model, tokenizer, rows: list[dict], answer: str = "auto", max_new_tokens: int | None = None,
                     batch_size: int = 8, progress: bool = False, n_samples: int = 5) -> dict:
    """Greedy generation accuracy on prompt/completion (or chat) rows; see the module docstring."""
    from moelab.data.sft import to_messages

    if answer not in ANSWER_MODES:
        raise MoelabError(f"answer must be one of {', '.join(ANSWER_MODES)} (got {answer!r})")
    if not rows:
        raise DataError("no examples to score")
    mode = ("exact" if is_moelab(model) else "number") if answer == "auto" else answer
    max_new_tokens = max_new_tokens or (32 if mode == "exact" else 256)
    if is_moelab(model) and mode == "exact":
        from moelab.evaluate.exact_match import score_exact_match

        out = score_exact_match(model, tokenizer.backend_tokenizer, rows, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=progress, n_samples=n_samples)
        return {**out, "answer": mode}
    prompts, refs = [], []
    for r in rows:
        msgs = to_messages(r)
        if msgs[-1]["role"] != "assistant" or [m["role"] for m in msgs[:-1]] != ["user"]:
            raise DataError("each generation example must be one user prompt and the reference answer")
        prompts.append(msgs[0]["content"])
        refs.append(msgs[-1]["content"])
    with Bars(progress) as bar:
        task = bar.add_task("generating", total=len(prompts))
        preds = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size,
                               on_batch=lambda n: bar.advance(task, n))
    ok = [answer_correct(p, a, mode) for p, a in zip(preds, refs, strict=True)]
    samples = [{"prompt": prompts[i], "answer": refs[i], "prediction": preds[i], "correct": ok[i]}
               for i in range(min(n_samples, len(rows)))]
    return {"accuracy": sum(ok) / len(rows), "correct": sum(ok), "n": len(rows), "answer": mode,
            "samples": samples}


# -- tasks ------------------------------------------------------------------------------------------

def read_task_file(path: str | Path, n: int | None = None) -> list[dict]:
    """Rows of a JSONL task file (generation rows ``prompt``/``completion`` or ``messages``; multiple-choice
    rows ``question``/``choices``/``answer``), the first ``n`` if given."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist; give a JSONL task file, or one of the built-in tasks")
    rows = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p} as UTF-8 text: {e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{i}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{i}: expected a JSON object")
        rows.append(obj)
        if n is not None and len(rows) >= n:
            break
    if not rows:
        raise DataError(f"{p} has no examples (empty file)")
    return rows


def is_multiple_choice(rows: list[dict]) -> bool:
    kinds = {"choices" in r for r in rows}
    if len(kinds) > 1:
        raise DataError("the task file mixes multiple-choice rows (with 'choices') and generation rows; split it")
    return kinds == {True}


def load_task(task: str, n: int = 200, seed: int = 1) -> list[dict]:
    """``n`` rows of a built-in task (``arithmetic``, ``arithmetic-hard``, ``gsm``: drawn with reasoning-gym,
    seed 1 by default so that they differ from ``moelab data tasks``' default training draw) or of a
    JSONL file."""
    if n < 1:
        raise DataError(f"n must be at least 1 (got {n})")
    if task.endswith((".jsonl", ".ndjson")) or Path(task).is_file():
        return read_task_file(task, n)
    from moelab.data.tasks import generate

    return generate(task, n, seed)


def evaluate_task(model, tokenizer, rows: list[dict], normalize: str = "none", answer: str = "auto",
                  max_new_tokens: int | None = None, batch_size: int = 8, progress: bool = False) -> dict:
    """Score ``rows`` as multiple choice or as generation, whichever they are."""
    if is_multiple_choice(rows):
        return {"kind": "multiple_choice",
                **score_multiple_choice(model, tokenizer, rows, normalize, batch_size, progress)}
    return {"kind": "generation",
            **score_generation(model, tokenizer, rows, answer, max_new_tokens, batch_size, progress)}


__all__ = ["LogLikelihood", "answer_correct", "evaluate_task", "extract_number", "load_task", "loglikelihood",
           "numbers_equal", "read_task_file", "score_generation", "score_multiple_choice"]
