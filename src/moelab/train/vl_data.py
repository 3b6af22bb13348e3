"""Vision-language training data for the one training loop (``moelab vl train``, docs/methods.md §12).

Records (JSON Lines, the format ``moelab vl data`` writes; image paths relative to the file)::

    {"messages": [{"role": "user", "content": "<image>\\nWhat is written?"},
                  {"role": "assistant", "content": "HELLO"}], "image": "images/ocr-0.png"}
    {"messages": [...], "images": ["a.png", "b.png"]}          several images, in <image> order
    {"text": "plain text"}                                     text-only (pre-training mixes 70% VL / 30% text)

Each record becomes token ids and labels through :class:`~moelab.vision.processor.VLProcessor` (template
``plain`` for alignment and pre-training, ``deepseek`` for SFT): −100 on prompts, image slots and padding.
Examples are packed whole, in file order, into rows of ``seq_len + 1`` tokens (one example per row with
``packing = false``); a row's images are kept in slot order, so filling the ``[B, T]`` batch's ``<image>``
positions row-major (``masked_scatter``) puts every image where it belongs.

    batch(B, T, step, micro, seed) -> {"x": [B, T] ids, "y": [B, T] targets, "images": [(views [V, 3, t, t],
                                       (tw, th)), ...]}       a pure function of (seed, step, micro)

Pixels are read per batch (the images are decoded once at load to refuse corrupt ones early).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moelab.data.epochs import epoch_indices
from moelab.errors import DataError
from moelab.lm.nll import lm_loss
from moelab.vision.processor import IGNORE, VLProcessor, open_image
from moelab.vision.tiling import Layout


@dataclass
class VLExample:
    """One record, tokenised: ids and labels, and its images (paths) with their layouts."""

    ids: list[int]
    labels: list[int]
    images: list[tuple[Path, Layout]] = field(default_factory=list)
    answer_bytes: int = 0


@dataclass
class VLLoadStats:
    skipped: list[str] = field(default_factory=list)      # "file:line: reason" (data.skip_malformed)
    too_long: int = 0


def _record_images(rec: dict, base: Path, where: str) -> list[Path]:
    imgs = rec.get("images", [rec["image"]] if "image" in rec else [])
    if not isinstance(imgs, list) or not all(isinstance(i, str) for i in imgs):
        raise DataError(f"{where}: 'image' must be a path and 'images' a list of paths")
    return [base / i for i in imgs]


def read_vl_records(path: str | Path, processor: VLProcessor, seq_len: int, skip_malformed: bool = False,
                    stats: VLLoadStats | None = None) -> list[VLExample]:
    """Every record of ``path`` tokenised (module docstring); a bad line is ``file:line: reason`` — an error,
    or skipped and counted with ``skip_malformed``. Examples longer than ``seq_len + 1`` tokens are errors too
    (their images alone may exceed the context: a smaller ``processor.max_tiles`` or a longer seq_len)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; make VL data with `moelab vl data --out DIR`")
    stats = stats if stats is not None else VLLoadStats()
    out = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                ex = _example(raw, path.parent, processor, where)
                if len(ex.ids) > seq_len + 1:
                    stats.too_long += 1
                    raise DataError(f"{where}: the example is {len(ex.ids)} tokens (images included) but rows hold "
                                    f"data.seq_len + 1 = {seq_len + 1}; raise data.seq_len or lower "
                                    "processor.max_tiles")
            except DataError as e:
                if not skip_malformed:
                    raise
                stats.skipped.append(str(e))
                continue
            out.append(ex)
    if not out:
        raise DataError(f"{path}: no usable records" + (f" ({len(stats.skipped)} skipped)" if stats.skipped else ""))
    return out


def _example(raw: bytes, base: Path, processor: VLProcessor, where: str) -> VLExample:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: not a JSON object ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record is a JSON object, not {type(rec).__name__}")
    if "text" in rec and "messages" not in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        msgs = [{"role": "assistant", "content": rec["text"]}]
        images = []
    else:
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs):
            raise DataError(f"{where}: needs 'messages' (a list of {{'role', 'content'}}) or 'text'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant turn: nothing to train on")
        images = _record_images(rec, base, where)
    sizes = []
    for p in images:
        try:
            sizes.append(open_image(p).size)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    try:
        ids, labels, layouts = processor.tokens(msgs, sizes)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    answer = sum(len(m["content"].strip().encode()) for m in msgs if m["role"] == "assistant")
    return VLExample(ids, labels, list(zip(images, layouts, strict=True)), answer)


class VLData:
    """The training interface of :class:`~moelab.data.sft.SFTData` for examples with images."""

    def __init__(self, examples: list[VLExample], processor: VLProcessor, seq_len: int, pad_id: int,
                 packing: bool = True, micro_per_step: int = 1, meta: dict | None = None, path: str = ""):
        if not examples:
            raise DataError("no VL examples in this split")
        self.processor, self.seq_len, self.micro_per_step, self.path = processor, seq_len, micro_per_step, path
        rows: list[list[VLExample]] = []
        used = seq_len + 2                      # forces a new row for the first example
        for ex in examples:
            if not packing or used + len(ex.ids) > seq_len + 1:
                rows.append([])
                used = 0
            rows[-1].append(ex)
            used += len(ex.ids)
        R, L = len(rows), seq_len + 1
        self.ids = np.full((R, L), pad_id, dtype=np.int64)
        self.labels = np.full((R, L), IGNORE, dtype=np.int64)
        self.row_images: list[list[tuple[Path, Layout]]] = []
        for r, row in enumerate(rows):
            ids = [t for ex in row for t in ex.ids]
            self.ids[r, :len(ids)] = ids
            self.labels[r, :len(ids)] = [t for ex in row for t in ex.labels]
            self.row_images.append([im for ex in row for im in ex.images])
        self.meta = dict(meta or {}, examples=len(examples), rows=R)
        self.bytes_per_token = sum(ex.answer_bytes for ex in examples) / max(self.target_tokens, 1)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def _check(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise DataError(f"VL rows were made for seq_len {self.seq_len}, not {seq_len}")

    def rows(self, idx: np.ndarray) -> dict:
        """``{"x", "y", "images"}`` of rows ``idx`` (module docstring)."""
        images = [im for i in idx for im in self.row_images[i]]
        views = self.processor.views([p for p, _ in images], [lay for _, lay in images]) if images else []
        return {"x": torch.from_numpy(self.ids[idx, :-1].copy()), "y": torch.from_numpy(self.labels[idx, 1:].copy()),
                "images": views}

    def batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0, seed: int = 0) -> dict:
        self._check(seq_len)
        start = (step * self.micro_per_step + micro) * batch_size
        return self.rows(epoch_indices(len(self), start, batch_size, seed, salt=0x564C))

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[dict]:
        """The rows in order."""
        self._check(seq_len)
        for b, s in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.rows(np.arange(s, min(s + batch_size, len(self))))

    def n_eval_windows(self, seq_len: int) -> int:
        return len(self)

    @staticmethod
    def model_inputs(rows: dict, device: torch.device) -> dict:
        return {"images": [(v.to(device), t) for v, t in rows["images"]]}

    @staticmethod
    def loss_fn(logits_BTV: torch.Tensor, rows: dict) -> tuple[torch.Tensor, dict]:
        return lm_loss(logits_BTV, rows["y"].to(logits_BTV.device)), {}


__all__ = ["VLData", "VLExample", "VLLoadStats", "read_vl_records"]
