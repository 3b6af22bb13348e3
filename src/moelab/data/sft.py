"""Supervised fine-tuning data: chat or prompt/completion JSON Lines → packed rows with loss masks.

Input, one JSON object per line (blank lines are ignored)::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}

Templates (``template``):

* ``deepseek`` (default) — the DeepSeek-V3 chat format, built from the special tokens::

      <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...

* ``plain`` — the ESFT format (docs/methods.md §5): ``{system}\\n\\nUser: {x}\\n\\nAssistant: {y}<eos>``, BOS first.

Loss only on what the model should learn to say: each assistant turn's content and the EOS after it
(labels −100 everywhere else). A prompt/completion pair is one user turn and one assistant turn.
Each segment is tokenised on its own and the ids concatenated, so a mask boundary never falls inside
a token.

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
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from moelab.data.sources import DataWarning
from moelab.data.tokenizer import ASSISTANT, BOS, EOS, PAD, USER, load_tokenizer
from moelab.errors import DataError

IGNORE = -100
Template = Literal["deepseek", "plain"]
_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenised conversation: ``ids`` [n] and ``labels`` [n] (−100 where no loss)."""

    ids: list[int]
    labels: list[int]
    answer_bytes: int            # UTF-8 bytes of the trained text (for bits per byte)


@dataclass
class SFTStats:
    lines: int = 0
    examples: int = 0
    skipped: list[str] = field(default_factory=list)   # "file:line: reason"
    truncated: int = 0
    no_target: int = 0                                 # examples whose trained part was cut away


# -- reading ------------------------------------------------------------------------------------------

#: How the user of a caller turns skipping malformed lines on: read_jsonl's own argument (the default),
#: a fine-tuning run's setting (load_sft).
LIBRARY_SKIP_HINT = "pass skip_malformed=True"
FINETUNE_SKIP_HINT = "pass skip_malformed (--set data.skip_malformed=true)"


def read_jsonl(path: str | os.PathLike, skip_malformed: bool = False, stats: SFTStats | None = None,
               skip_hint: str | None = LIBRARY_SKIP_HINT) -> Iterator[tuple[str, list[dict]]]:
    """Yield ``(where, messages)`` for each line of a chat or prompt/completion JSONL file.

    A malformed line raises :class:`DataError` naming the file and line, unless ``skip_malformed``,
    which skips it and records it in ``stats.skipped``. ``skip_hint`` tells the user how the caller
    turns skipping on; a caller that cannot skip passes None, and the error only says to fix the line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist; give a JSON Lines file with 'messages' or 'prompt'/'completion'")
    stats = stats if stats is not None else SFTStats()
    try:
        fh = open(p, encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise DataError(f"cannot read {p}: {e}") from None
    with fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError:
                raise DataError(f"{p}: line {lineno + 1} is not UTF-8 text; re-encode the file as UTF-8") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            stats.lines += 1
            where = f"{p}:{lineno}"
            try:
                messages = to_messages(json.loads(line))
            except (json.JSONDecodeError, DataError) as e:
                reason = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                if not skip_malformed:
                    how = (f"fix the line, or {skip_hint} to skip and count such lines" if skip_hint
                           else "fix or remove the line")
                    raise DataError(f"{where}: {reason}; {how}") from None
                stats.skipped.append(f"{where}: {reason}")
                continue
            yield where, messages


def to_messages(obj) -> list[dict]:
    """Normalise one record to a list of ``{"role", "content"}`` messages (validated)."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"message {i} must be an object with string 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise DataError(f"message {i} has role {m['role']!r}; use one of {', '.join(_ROLES)}")
            if m["role"] == "system" and i != 0:
                raise DataError(f"message {i}: a system message may only come first")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError("the conversation has no assistant message, so nothing to learn from")
        return out
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise DataError("'prompt' and 'completion' must both be strings")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise DataError(f"no 'messages' and no 'prompt'/'completion' keys (found: {', '.join(sorted(obj)) or 'none'})")


# -- rendering ----------------------------------------------------------------------------------------

class ChatFormat:
    """Renders messages into token ids and labels with a tokenizer and a template."""

    def __init__(self, tokenizer: Tokenizer, template: Template = "deepseek"):
        if template not in ("deepseek", "plain"):
            raise DataError(f"unknown chat template {template!r}; use 'deepseek' or 'plain'")
        self.tok, self.template = tokenizer, template
        self.bos, self.eos = self._special(BOS), self._special(EOS)
        self.pad = tokenizer.token_to_id(PAD)
        self.pad = self.eos if self.pad is None else self.pad
        if template == "deepseek":
            self.user, self.assistant = self._special(USER), self._special(ASSISTANT)

    def _special(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise DataError(f"the tokenizer has no {token!r} token; use template 'plain' or a tokenizer that "
                            "reserves the DeepSeek special tokens (every moelab tokenizer does)")
        return i

    def _text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def render(self, messages: list[dict]) -> Example:
        ids, labels, answer_bytes = [self.bos], [IGNORE], 0

        def add(part: list[int], train: bool) -> None:
            ids.extend(part)
            labels.extend(part if train else [IGNORE] * len(part))

        msgs = list(messages)
        if msgs and msgs[0]["role"] == "system":
            sys_text = msgs.pop(0)["content"]
            add(self._text(sys_text + ("\n\n" if self.template == "plain" and sys_text else "")), False)
        for m in msgs:
            if m["role"] == "user":
                if self.template == "deepseek":
                    add([self.user] + self._text(m["content"]) + [self.assistant], False)
                else:
                    add(self._text(f"User: {m['content']}\n\nAssistant: "), False)
            else:  # assistant
                add(self._text(m["content"]) + [self.eos], True)
                answer_bytes += len(m["content"].encode())
        return Example(ids, labels, answer_bytes)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids that ask the model for the next assistant turn (generation prompt)."""
        ex = self.render(list(messages) + [{"role": "assistant", "content": ""}])
        return ex.ids[:-1]   # without the EOS of the empty answer


# -- packing ------------------------------------------------------------------------------------------

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


__all__ = ["IGNORE", "ChatFormat", "Example", "SFTData", "SFTStats", "load_sft", "pack", "pack_file",
           "read_jsonl", "to_messages"]
