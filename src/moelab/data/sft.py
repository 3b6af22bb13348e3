"""Supervised fine-tuning data: chat or prompt/completion JSON Lines → packed rows with loss masks.

Reading and rendering (templates, loss masks) are in :mod:`moelab.data.chat`; this module packs the
rendered examples into rows and serves them in batches.

Packing (``pack = True``): whole examples are laid greedily, in a seeded random order, into rows of
``seq_len + 1`` tokens (``x = row[:-1]``, ``y = labels[1:]``); the rest of a row is PAD with label −100.
An example longer than a row is truncated (counted and reported). Packed examples share a row without an
attention barrier between them, as in the ESFT and DeepSeek recipes; the first token of each example is
never a target, so no loss crosses an example boundary. ``pack = False`` gives one example per row.

Shapes: B rows per batch, T = ``seq_len``; ``x`` int64 [B, T], ``y`` int64 [B, T] with −100 = no loss.

:class:`SFTData` has the batch interface of :class:`moelab.data.tokens.TokenData`, so the training loop
takes either. Batches are a pure function of ``(seed, step, micro)``: epoch ``k`` visits the rows in a
permutation seeded by ``(seed, k)``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from moelab.data.chat import (
    FINETUNE_SKIP_HINT,
    IGNORE,
    LIBRARY_SKIP_HINT,
    ChatFormat,
    Example,
    SFTStats,
    Template,
    read_jsonl,
    to_messages,
)
from moelab.data.sources import DataWarning
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import DataError


def pack(examples: list[Example], seq_len: int, pad_id: int, seed: int = 0, packing: bool = True,
         stats: SFTStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lay examples into rows: returns ``ids`` and ``labels``, int64 ``[R, seq_len + 1]``."""
    stats = stats if stats is not None else SFTStats()
    width = seq_len + 1
    order = np.random.default_rng(seed).permutation(len(examples)) if packing else np.arange(len(examples))
    rows_ids: list[list[int]] = []
    rows_lab: list[list[int]] = []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    for i in order:
        ex = examples[int(i)]
        ids, lab = ex.ids, ex.labels
        if len(ids) > width:
            stats.truncated += 1
            ids, lab = ids[:width], lab[:width]
            if all(v == IGNORE for v in lab[1:]):
                stats.no_target += 1
                continue
        if packing and len(cur_ids) + len(ids) <= width:
            cur_ids += ids
            cur_lab += lab
            continue
        if cur_ids:
            rows_ids.append(cur_ids)
            rows_lab.append(cur_lab)
        cur_ids, cur_lab = list(ids), list(lab)
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_lab.append(cur_lab)
    R = len(rows_ids)
    out_ids = np.full((R, width), pad_id, dtype=np.int64)
    out_lab = np.full((R, width), IGNORE, dtype=np.int64)
    for r in range(R):
        n = len(rows_ids[r])
        out_ids[r, :n] = rows_ids[r]
        out_lab[r, :n] = rows_lab[r]
    out_lab[:, 0] = IGNORE   # the first token of a row is never a target
    return out_ids, out_lab


def _is_val(where: str, index: int, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


class SFTData:
    """Packed SFT rows of one split, with the :class:`~moelab.data.tokens.TokenData` batch interface.

    ``batch(B, T, step, micro, seed)`` -> ``x, y`` int64 ``[B, T]`` (T must equal ``seq_len``);
    ``eval_batches(B, T, max_batches)`` walks the rows in order. ``micro_per_step`` (grad accumulation)
    makes consecutive micro-batches read consecutive rows of the epoch's permutation.
    """

    def __init__(self, ids: np.ndarray, labels: np.ndarray, bytes_per_token: float, meta: dict,
                 micro_per_step: int = 1):
        self.ids, self.labels = ids, labels
        self.seq_len = ids.shape[1] - 1
        self.bytes_per_token = bytes_per_token
        self.meta = meta
        self.micro_per_step = micro_per_step

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __repr__(self) -> str:
        return f"SFTData(rows={len(self)}, seq_len={self.seq_len}, target_tokens={self.target_tokens})"

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def _check(self, batch_size: int, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise DataError(f"SFT rows were packed for seq_len {self.seq_len}, not {seq_len}")
        if len(self) == 0:
            raise DataError("no SFT examples in this split; add data or lower data.val_fraction")

    def _rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.ids[rows, :-1].copy()), torch.from_numpy(self.labels[rows, 1:].copy()))

    def batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(batch_size, seq_len)
        R = len(self)
        start = (step * self.micro_per_step + micro) * batch_size
        idx = []
        for g in range(start, start + batch_size):
            epoch, pos = divmod(g, R)
            idx.append(_epoch_order(seed, epoch, R)[pos])
        return self._rows(np.asarray(idx))

    def eval_batches(self, batch_size: int, seq_len: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check(batch_size, seq_len)
        n = 0
        for s in range(0, len(self), batch_size):
            if max_batches is not None and n >= max_batches:
                return
            yield self._rows(np.arange(s, min(s + batch_size, len(self))))
            n += 1


_ORDERS: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _ORDERS:
        if len(_ORDERS) > 8:
            _ORDERS.clear()
        _ORDERS[key] = np.random.default_rng([seed, epoch, 0x5F7]).permutation(n)
    return _ORDERS[key]


def load_sft(path: str | os.PathLike, tokenizer: str | os.PathLike | Tokenizer, seq_len: int, *,
             template: Template = "deepseek", val_path: str | os.PathLike | None = None,
             val_fraction: float = 0.05, packing: bool = True, skip_malformed: bool = False, seed: int = 0,
             micro_per_step: int = 1) -> tuple[SFTData, SFTData, SFTStats]:
    """Read, render and pack an SFT file into train and validation :class:`SFTData`.

    The validation split is ``val_path`` when given, else a deterministic ``val_fraction`` of the
    examples (by a hash of their index and ``seed``; at least one when there are two or more).
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2 (got {seq_len})")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    fmt = ChatFormat(tok, template)
    stats = SFTStats()
    train_ex: list[Example] = []
    val_ex: list[Example] = []
    for i, (where, msgs) in enumerate(read_jsonl(path, skip_malformed, stats, FINETUNE_SKIP_HINT)):
        ex = fmt.render(msgs)
        (val_ex if val_path is None and _is_val(where, i, seed, val_fraction) else train_ex).append(ex)
    if val_path is not None:
        val_ex = [fmt.render(m) for _, m in read_jsonl(val_path, skip_malformed, stats, FINETUNE_SKIP_HINT)]
    elif not val_ex and val_fraction > 0 and len(train_ex) >= 2:
        val_ex.append(train_ex.pop())
    stats.examples = len(train_ex) + len(val_ex)
    if not train_ex:
        raise DataError(f"{path} holds no usable examples ({stats.lines} lines, {len(stats.skipped)} skipped)")
    packed, split_stats = [], {}
    for name, exs in (("train", train_ex), ("val", val_ex)):
        split_stats[name] = SFTStats()
        packed.append(pack(exs, seq_len, fmt.pad, seed=seed, packing=packing, stats=split_stats[name]))
        stats.truncated += split_stats[name].truncated
        stats.no_target += split_stats[name].no_target
    _check_dropped(path, val_path, seq_len, train_ex, val_ex, packed, split_stats, stats)
    splits = []
    for (name, exs), (ids, labels) in zip((("train", train_ex), ("val", val_ex)), packed, strict=True):
        n_target = int((labels[:, 1:] != IGNORE).sum())
        answer_bytes = sum(e.answer_bytes for e in exs)
        bpt = answer_bytes / n_target if n_target else 1.0
        meta = {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "split": name, "examples": len(exs),
                "rows": int(ids.shape[0]), "target_tokens": n_target, "template": template,
                "tokens": int((ids != fmt.pad).sum())}
        splits.append(SFTData(ids, labels, bpt, meta, micro_per_step))
    return splits[0], splits[1], stats


def _check_dropped(path, val_path, seq_len: int, train_ex: list, val_ex: list, packed: list,
                   split_stats: dict[str, SFTStats], stats: SFTStats) -> None:
    """Refuse a split whose every example was dropped (its prompt alone fills a row); warn, in one line,
    when examples were truncated or dropped."""
    how = f"prompt longer than seq_len ({seq_len}); raise data.seq_len or shorten the prompts"
    if packed[0][0].shape[0] == 0:           # every train example dropped
        n, d = len(train_ex), split_stats["train"].no_target
        if val_path is None:                 # the val examples come from the same file
            n, d = n + len(val_ex), d + split_stats["val"].no_target
        raise DataError(f"{path}: {d} of {n} examples dropped: {how}")
    if val_ex and packed[1][0].shape[0] == 0:
        n, d = len(val_ex), split_stats["val"].no_target
        where, what = (val_path, "examples") if val_path is not None else (path, "validation examples")
        raise DataError(f"{where}: {d} of {n} {what} dropped: {how}")
    if stats.truncated:
        n = len(train_ex) + len(val_ex)
        dropped = (f", {stats.no_target:,} of them dropped (prompt longer than seq_len)"
                   if stats.no_target else "")
        warnings.warn(f"{path}: {stats.truncated:,} of {n:,} examples are longer than seq_len ({seq_len}) and were "
                      f"truncated{dropped}; raise data.seq_len to keep them whole", DataWarning, stacklevel=3)


def pack_file(path: str | os.PathLike, tokenizer_path: str | os.PathLike, seq_len: int,
              n_sequences: int | None = None, template: Template = "deepseek",
              seed: int = 0) -> Iterator[torch.Tensor]:
    """Packed input rows (int64 ``[seq_len]``) of a whole SFT file, for scoring (e.g. ESFT)."""
    tok = load_tokenizer(tokenizer_path)
    fmt = ChatFormat(tok, template)
    examples = [fmt.render(m) for _, m in read_jsonl(path, skip_hint=None)]   # callers cannot skip lines
    if not examples:
        raise DataError(f"{path} holds no examples")
    ids, _ = pack(examples, seq_len, fmt.pad, seed=seed)
    for r in range(ids.shape[0] if n_sequences is None else min(n_sequences, ids.shape[0])):
        yield torch.from_numpy(ids[r, :-1].copy())


__all__ = ["FINETUNE_SKIP_HINT", "IGNORE", "LIBRARY_SKIP_HINT", "ChatFormat", "Example", "SFTData", "SFTStats",
           "Template", "load_sft", "pack", "pack_file", "read_jsonl", "to_messages"]
