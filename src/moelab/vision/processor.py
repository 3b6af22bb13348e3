"""Conversations with images -> token ids, labels and encoder views for a DeepSeek-VL2-style model
(docs/methods.md §12).

    proc = VLProcessor(tokenizer)                       # a tokenizers.Tokenizer with the VL special tokens
    batch = proc.process([{"role": "user", "content": "<image>\\nWhat is written here?"},
                          {"role": "assistant", "content": "HELLO"}], [Image.open("sign.png")])
    batch.input_ids, batch.labels, batch.images          # [n], [n], [(views [V, 3, T, T], (tw, th)), ...]

Template ``deepseek`` (byte-exact, as METHODS §12 gives it; several turns repeat the turn):

    [BOS][system\\n\\n]<|User|>: {content}\\n\\n<|Assistant|>:{answer.strip()}[EOS]

Each ``<image>`` in the text becomes N copies of the ``<image>`` token, N from the image's layout
(:mod:`moelab.vision.tiling`; more than two images in the conversation: no tiling). Labels are −100 on
everything but the answers and their EOS — prompts and image slots carry no loss. The chat markers of VL2
use ASCII bars (``<|User|>``), unlike DeepSeek-V3's full-width ``<｜User｜>``; :func:`add_vl_tokens` adds
them (and ``<image>``, the grounding tokens) to a tokenizer as special tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from moelab.data.tokenizer import BOS, EOS
from moelab.errors import DataError
from moelab.vision.grounding import DET, DET_END, GROUNDING, REF, REF_END
from moelab.vision.tiling import DOWNSAMPLE, MAX_TILES, PATCH, TILE, Layout, layout
from moelab.vision.views import image_views

IMAGE = "<image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
VL_TOKENS = [IMAGE, REF, REF_END, DET, DET_END, GROUNDING, USER, ASSISTANT]
IGNORE = -100
#: ``deepseek``: the chat template (SFT); ``plain``: ``<image>\n{caption}`` pre-training text (stages 1–2).
TEMPLATES = ("deepseek", "plain")
#: An image with more pixels than this is refused (PIL's own decompression-bomb limit).
MAX_PIXELS = 89_478_485


def add_vl_tokens(tok: Tokenizer) -> Tokenizer:
    """Add the VL2 special tokens that ``tok`` lacks (in place); returns it."""
    missing = [t for t in VL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok


def open_image(path: str | os.PathLike):
    """A PIL RGB image, or a :class:`DataError` saying what is wrong with the file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such image file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty (0 bytes)")
    try:
        with Image.open(p) as im:
            W, H = im.size
            if W * H > MAX_PIXELS:
                raise DataError(f"{p}: {W}×{H} pixels is beyond the {MAX_PIXELS:,}-pixel limit; downscale it first")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DataError(f"{p}: not a readable image ({type(e).__name__}: {str(e)[:120]}); is it corrupt or "
                        "truncated?") from None


@dataclass
class VLExample:
    input_ids: list[int]
    labels: list[int]
    images: list[tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=list)


class VLProcessor:
    """Renders conversations with images (module docstring)."""

    def __init__(self, tokenizer: Tokenizer, tile: int = TILE, patch: int = PATCH, downsample: int = DOWNSAMPLE,
                 max_tiles: int = MAX_TILES, template: str = "deepseek"):
        if template not in TEMPLATES:
            raise DataError(f"unknown VL template {template!r}; use one of {', '.join(TEMPLATES)}")
        self.tok, self.template = tokenizer, template
        ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, IMAGE, USER, ASSISTANT)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise DataError(f"the tokenizer lacks {missing}; add them with moelab.vision.processor.add_vl_tokens")
        self.ids = ids
        self.tiling = dict(tile=tile, patch=patch, downsample=downsample, max_tiles=max_tiles)

    def text(self, messages: list[dict]) -> str:
        """The conversation as text (``<image>`` not yet expanded)."""
        return "".join(t for t, _ in self._segments(messages))

    def _segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """(text, trained) pieces in order."""
        out, msgs = [(BOS, False)], list(messages)
        if self.template == "plain":
            return out + self._plain(msgs)
        if msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
            if system:
                out.append((system + "\n\n", False))
        for m in msgs:
            if m["role"] == "user":
                out.append((f"{USER}: {m['content']}\n\n{ASSISTANT}:", False))
            elif m["role"] == "assistant":
                out += [(m["content"].strip(), True), (EOS, True)]
            else:
                raise DataError(f"role {m['role']!r}: a VL conversation has system, user and assistant turns")
        return out

    @staticmethod
    def _plain(msgs: list[dict]) -> list[tuple[str, bool]]:
        """Pre-training text (stages 1–2): ``{user content}\n{answer}[EOS]`` per exchange — a caption record
        (user content ``<image>``) becomes ``<image>\n{caption}`` — and a lone assistant turn (text-only data)
        is trained whole."""
        out = []
        for m in msgs:
            if m["role"] == "user":
                out.append((m["content"].rstrip("\n") + "\n", False))
            elif m["role"] == "assistant":
                out += [(m["content"].strip(), True), (EOS, True)]
            elif m["role"] != "system":
                raise DataError(f"role {m['role']!r}: a VL conversation has system, user and assistant turns")
        return out

    def process(self, messages: list[dict], images: list) -> VLExample:
        """Token ids, labels and views of one conversation with its images (PIL images or paths)."""
        self.check_slots(messages, len(images))
        pics = [open_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB") for im in images]
        ids, labels, layouts = self.tokens(messages, [p.size for p in pics])
        return VLExample(ids, labels, [(image_views(p, lay), lay.tiles) for p, lay in zip(pics, layouts, strict=True)])

    def check_slots(self, messages: list[dict], n_images: int) -> None:
        n_slots = self.text(messages).count(IMAGE)
        if n_slots != n_images:
            raise DataError(f"the conversation has {n_slots} {IMAGE} placeholder(s) but {n_images} image(s) were "
                            f"given; put one {IMAGE} where each image belongs")

    def views(self, images: list, layouts: list[Layout]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """The encoder views of ``images`` (PIL images or paths) laid out as ``layouts``."""
        pics = [open_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB") for im in images]
        return [(image_views(p, lay), lay.tiles) for p, lay in zip(pics, layouts, strict=True)]

    def tokens(self, messages: list[dict], sizes: list[tuple[int, int]]) -> tuple[list[int], list[int], list[Layout]]:
        """(ids, labels, layouts) of a conversation whose images have ``sizes`` (W, H) — no pixels needed."""
        self.check_slots(messages, len(sizes))
        layouts = [layout(tuple(sz), n_images=len(sizes), **self.tiling) for sz in sizes]
        ids, labels, k = [], [], 0
        for piece, trained in self._segments(messages):
            parts = piece.split(IMAGE)
            for j, part in enumerate(parts):
                enc = self.tok.encode(part, add_special_tokens=False).ids if part else []
                ids += enc
                labels += enc if trained else [IGNORE] * len(enc)
                if j < len(parts) - 1:                       # an <image> slot: N image tokens, no loss
                    n = layouts[k].tokens
                    ids += [self.ids[IMAGE]] * n
                    labels += [IGNORE] * n
                    k += 1
        return ids, labels, layouts


__all__ = ["ASSISTANT", "IMAGE", "MAX_PIXELS", "TEMPLATES", "USER", "VL_TOKENS", "VLExample", "VLProcessor",
           "add_vl_tokens", "open_image"]
