"""A vision-language checkpoint ready to answer questions about images (``moelab vl chat``).

    bot = VLChat("runs/vl-sft/model")
    bot.ask("What is written in the image?", ["sign.png"])           # -> "HELLO"
    for rec in bot.answer_file("questions.jsonl"):                     # {"prompt", "image" | "images"}
        ...                                                            # -> {"line", "prompt", "answer"}

Prompts use the chat template (``<|User|>: ...\\n\\n<|Assistant|>:``); a prompt without ``<image>`` gets one
``<image>\\n`` in front per image. Batches of ``batch_size`` conversations are generated together
(:func:`moelab.evaluate.vl_generate.vl_generate`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moelab.common.device import resolve_device
from moelab.errors import DataError
from moelab.infer.sampling import SamplingConfig
from moelab.interop.vl_checkpoint import load_vl
from moelab.vision.processor import IMAGE, VLProcessor


def user_messages(prompt: str, n_images: int, system: str | None = None) -> list[dict]:
    """A one-question conversation; ``<image>\\n`` per image in front if the prompt has none."""
    if IMAGE not in prompt:
        prompt = f"{IMAGE}\n" * n_images + prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


class VLChat:
    def __init__(self, checkpoint: str | Path, device: str = "auto", max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, prefill_chunk: int = 0,
                 system: str | None = None):
        ckpt = Path(checkpoint)
        dev = resolve_device(device)
        self.model = load_vl(ckpt, dtype=torch.float32 if dev == "cpu" else torch.bfloat16, device=dev)
        tok_file = ckpt / "tokenizer.json"
        if not tok_file.is_file():
            raise DataError(f"{ckpt} has no tokenizer.json; a VL checkpoint written by moelab has one")
        self.processor = VLProcessor(Tokenizer.from_file(str(tok_file)), **self.model.processor_settings())
        self.sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        self.max_new_tokens, self.prefill_chunk, self.system = max_new_tokens, prefill_chunk, system

    def answer(self, conversations: list[tuple[list[dict], list]], batch_size: int = 8) -> list[str]:
        from moelab.evaluate.vl_generate import vl_generate

        return vl_generate(self.model, self.processor, conversations, self.max_new_tokens, self.sampling,
                           self.prefill_chunk, batch_size)

    def ask(self, prompt: str, images: list) -> str:
        return self.answer([(user_messages(prompt, len(images), self.system), list(images))])[0]

    def answer_file(self, path: str | Path, batch_size: int = 8) -> Iterator[dict]:
        """Answers to a JSON Lines file of ``{"prompt", "image" | "images"}`` (image paths relative to it)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        items = []
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                prompt = rec["prompt"]
                imgs = rec.get("images", [rec["image"]] if "image" in rec else [])
                if not isinstance(prompt, str) or not isinstance(imgs, list):
                    raise TypeError("'prompt' must be a string and 'images' a list")
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: {type(e).__name__}: {e}; each line is "
                                '{"prompt": "...", "image": "a.png"}') from None
            items.append((n, prompt, [path.parent / i for i in imgs]))
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            try:
                answers = self.answer([(user_messages(p, len(im), self.system), im) for _, p, im in chunk],
                                      batch_size)
            except DataError as e:
                raise DataError(f"{path}: lines {chunk[0][0]}–{chunk[-1][0]}: {e}") from None
            for (n, p, _), a in zip(chunk, answers, strict=True):
                yield {"line": n, "prompt": p, "answer": a}


__all__ = ["VLChat", "user_messages"]
