"""Answers of a vision-language model to conversations with images (``moelab vl chat``, the VL benchmark).

    answers = vl_generate(model, processor, [(messages, [image, ...]), ...], max_new_tokens=32)

Per batch of ``batch_size`` conversations (each ending with a user turn):

    ids_BT, mask_BT   the prompts rendered by the processor (``<|Assistant|>:`` last for the chat template),
                      left-padded; each ``<image>`` expanded to its layout's N image tokens
    embeds_BTD        the text embeddings with the images' features written into their slots, row-major
    prefill           embeds in chunks of ``prefill_chunk`` positions into the decoding cache (0: at once)
    decode            one token per step from the language model (:func:`moelab.infer.generate.generate`)

Answers are cut at EOS and decoded keeping the VL tokens (``<|ref|>``, ``<|det|>``, ...) that grounding
answers are made of; padding and BOS are dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moelab.data.tokenizer import BOS, EOS
from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingConfig
from moelab.lm.padding import left_pad
from moelab.model.vl_model import VisionLanguageModel
from moelab.vision.processor import VLProcessor


def pad_id(processor: VLProcessor) -> int:
    for name in ("<｜▁pad▁｜>", EOS):
        i = processor.tok.token_to_id(name)
        if i is not None:
            return i
    return 0


def decode_answer(processor: VLProcessor, ids: list[int]) -> str:
    """The text of generated ids up to the first EOS, VL tokens kept, padding and BOS dropped."""
    eos = processor.ids[EOS]
    if eos in ids:
        ids = ids[:ids.index(eos)]
    drop = {pad_id(processor), processor.ids[BOS]}
    return processor.tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)


@torch.inference_mode()
def vl_generate(model: VisionLanguageModel, processor: VLProcessor, conversations: list[tuple[list[dict], list]],
                max_new_tokens: int = 64, sampling: SamplingConfig | None = None, prefill_chunk: int = 0,
                batch_size: int = 8, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The answer to each ``(messages, images)`` (module docstring); images are PIL images or paths."""
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for s in range(0, len(conversations), batch_size):
        chunk = conversations[s:s + batch_size]
        prompts, images = [], []
        for messages, imgs in chunk:
            ex = processor.process(messages, list(imgs))
            prompts.append(ex.input_ids)
            images += ex.images
        ids, mask = left_pad(prompts, pad_id(processor))
        ids, mask = ids.to(device), mask.to(device)
        embeds = model.embed(ids, [(v.to(device), t) for v, t in images])
        new = generate(model.language, ids, max_new_tokens, sampling or SamplingConfig(greedy=True),
                       eos_token_id=processor.ids[EOS], attention_mask=mask, prefill_chunk=prefill_chunk,
                       inputs_embeds=embeds)
        out += [decode_answer(processor, row) for row in new[:, ids.shape[1]:].tolist()]
        if on_batch is not None:
            on_batch(len(chunk))
    return out


__all__ = ["decode_answer", "pad_id", "vl_generate"]
