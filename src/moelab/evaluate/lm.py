"""Prompts, start tokens and greedy generation for the two kinds of causal LM the evaluators accept: a moelab
:class:`~moelab.model.transformer.DeepSeekForCausalLM` and any ``transformers`` causal LM (e.g. the
SmolLM2 of :func:`moelab.interop.hf_lm.load_causal_lm`). Both come with a ``transformers`` fast tokenizer.

    logits_BTV = forward_logits(model, ids_BT)                       # [B, T, V], fp32
    texts = generate_texts(model, tokenizer, ["What is 2 + 3?"], max_new_tokens=32)

Dimension letters: B batch, T tokens, V vocabulary. The model-facing part (logits, left padding, device
and context length) lives in :mod:`moelab.lm` and is re-exported here under its old names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moelab.errors import MoelabError
from moelab.lm.logits import context_length, forward_logits, is_moelab, model_device  # re-exported
from moelab.lm.padding import left_pad  # re-exported


def separator_id(model, tokenizer) -> int:
    """The token that starts a scored stream and separates documents.

    moelab models: EOS, as in token directories (every document there is followed by EOS, so a
    document's first token is predicted from an EOS). Other models: BOS, else EOS.
    """
    order = ("eos_token_id", "bos_token_id") if is_moelab(model) else ("bos_token_id", "eos_token_id")
    for name in order:
        i = getattr(tokenizer, name, None)
        if i is not None:
            return int(i)
    raise MoelabError("the tokenizer has neither a BOS nor an EOS token, so a document has no start context; "
                      "use a tokenizer that defines one")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


# -- generation -------------------------------------------------------------------------------------

def chat_prompt_ids(model, tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids asking the model to answer ``user`` as the assistant.

    moelab models: the moelab DeepSeek chat template (as in :mod:`moelab.evaluate.exact_match`).
    transformers models: the tokenizer's chat template when it has one, else the plain text.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if is_moelab(model):
        from moelab.data.sft import ChatFormat

        return ChatFormat(tokenizer.backend_tokenizer, "deepseek").prompt_ids(messages)
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(i) for i in out]
    text = (system + "\n\n" if system else "") + user
    return encode(tokenizer, text)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        i = getattr(tokenizer, name, None)
        if i is not None:
            return int(i)
    return 0


@torch.inference_mode()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of one left-padded batch of prompts, each cut at the first EOS (excluded)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids, mask = left_pad(prompts, _pad_id(tokenizer))
    dev = model_device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    if is_moelab(model):
        from moelab.infer.generate import generate

        out = generate(model, ids, max_new_tokens, eos_token_id=eos, attention_mask=mask)
    else:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=_pad_id(tokenizer), eos_token_id=eos, temperature=None, top_p=None,
                             top_k=None)
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        result.append(row)
    return result


def generate_texts(model, tokenizer, prompts: list[str] | list[list[int]], max_new_tokens: int = 64,
                   batch_size: int = 8, system: str | None = None,
                   on_batch: Callable[[int], None] | None = None, strip: bool = True) -> list[str]:
    """Greedy answers to ``prompts`` (user messages rendered with :func:`chat_prompt_ids`, or token-id
    lists used as they are), decoded without special tokens (and stripped of surrounding white space unless
    ``strip=False``); left-padded batches of ``batch_size``.

    Prompts are sorted by length so that a batch pads little; answers come back in the input order.
    ``on_batch(n)`` is called after each batch of n prompts (for progress bars).
    """
    if max_new_tokens < 1:
        raise MoelabError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if batch_size < 1:
        raise MoelabError(f"batch_size must be >= 1 (got {batch_size})")
    ids = [p if isinstance(p, list) else chat_prompt_ids(model, tokenizer, p, system) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            outs = generate_ids(model, tokenizer, [ids[i] for i in chunk], max_new_tokens)
            for i, row in zip(chunk, outs, strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                answers[i] = text.strip() if strip else text
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    return answers


__all__ = ["chat_prompt_ids", "context_length", "encode", "forward_logits", "generate_ids", "generate_texts",
           "is_moelab", "left_pad", "model_device", "separator_id"]
