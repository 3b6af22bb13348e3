"""Token directories: ``prepare`` turns corpora into flat token files; ``TokenData`` reads them.

Format ``moelab-tokens-v1`` (one directory)::

    tokenizer.json, tokenizer_config.json   the tokenizer (opens in transformers' AutoTokenizer)
    train.bin, val.bin                      token ids, flat, native byte order; uint16 if vocab_size
                                            <= 65535, else uint32. Every document is its tokens then
                                            EOS (id 1); no BOS, no padding.
    train.idx.npy, val.idx.npy              int64 [n_docs + 1]: document d is bin[idx[d]:idx[d+1]]
                                            (its last token is the EOS)
    meta.json                               format, dtype, vocab and special ids, per-split documents /
                                            tokens / bytes, bytes per token, sources, skips, seed

Token counts include the EOS tokens and byte counts are UTF-8 bytes of the document texts, so
``bytes_per_token`` converts a mean loss over the token stream into bits per byte.

The split is by whole document: document i (0-based, in reading order) goes to val when its key
``blake2b(seed, i, origin)`` is among the ``n_val`` smallest, ``n_val = round(val_fraction * n)``
(at least 1 when there are two documents or more) or ``val_docs``. The tokenizer, when trained here,
sees the train documents only, so val bytes/token is an honest held-out number.

Batches are stateless: ``TokenData.batch(B, T, step, micro, seed)`` draws its windows from a numpy
Generator seeded by ``(seed, step, micro)``, so the batch of any step can be recomputed after a resume.
Shapes: B = batch size, T = sequence length; ``x``, ``y`` are int64 [B, T] with ``y[:, t] = x[:, t+1]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from tokenizers import Tokenizer

from moelab.common.atomic import TOKENS, check_output_dir, write_dir
from moelab.data.sources import DataWarning, Document, ReadStats, Source
from moelab.data.tokenizer import (
    check_layout,
    check_vocab_size,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from moelab.errors import DataError, MoelabError

FORMAT = "moelab-tokens-v1"
SPLITS = ("train", "val")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
_BATCH_BYTES = 1 << 20  # documents handed to encode_batch at once (~1 MB of text)
#: Default of ``max_chunk_bytes``: the most text encoded at once. The tokenizer holds ~250 bytes per byte of
#: text while encoding (ids, offsets, token strings), so 1 MiB bounds encoding at ~0.3 GB.
MAX_CHUNK_BYTES = 1 << 20
_MIN_CHUNK_BYTES = 1 << 10
#: A long document is cut into pieces of max_chunk_bytes / 8, so that one encode_batch call of at most
#: max_chunk_bytes encodes several pieces in parallel.
_PIECES_PER_CHUNK = 8


# -- prepare ------------------------------------------------------------------------------------------

def prepare(
    sources: str | os.PathLike | Source | Iterable[str | os.PathLike | Source],
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    val_fraction: float = 0.05,
    val_docs: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    strict: bool = False,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> dict:
    """Read ``sources``, train (or load) a tokenizer, and write a token directory at ``out_dir``.

    Three passes over the corpus: read (count documents, choose the val split, report skips), train the
    tokenizer on the train documents (skipped when ``tokenizer`` is given: a ``tokenizer.json``, a
    directory holding one, or a Tokenizer), encode. Everything is written to a temporary directory
    beside ``out_dir`` and renamed into place at the end, so an error or Ctrl-C leaves nothing behind.
    ``out_dir`` may exist only if empty, or (with ``overwrite``) if it is a token directory.

    Returns the ``meta.json`` dict. With ``progress``, shows progress bars and a summary table.

    ``max_chunk_bytes`` bounds the memory of tokenisation: at most this many UTF-8 bytes of text are
    encoded at once, and a long document is encoded (and fed to the tokenizer trainer) in pieces of 1/8 of
    it, cut just before a whitespace character that precedes a word, which leaves the tokens unchanged;
    only where a piece has no such place in its second half is it cut mid-word, which can change the one
    or two tokens at that cut (see :func:`_chunks`).
    """
    if max_chunk_bytes < _MIN_CHUNK_BYTES:
        raise DataError(f"max_chunk_bytes must be at least {_MIN_CHUNK_BYTES} (got {max_chunk_bytes})")
    srcs = _sources(sources, text_field)
    out = Path(out_dir)
    if val_docs is None and not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    if val_docs is not None and val_docs < 0:
        raise DataError(f"val_docs must be >= 0 (got {val_docs})")
    if seed < 0:
        raise DataError(f"seed must be >= 0 (got {seed})")
    check_output_dir(out, TOKENS, overwrite)
    tok = _given_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None:
        check_vocab_size(vocab_size)
    console = console or Console(stderr=True)

    result: dict = {}

    def build(tmp: Path) -> None:
        nonlocal tok
        with _progress(console, progress) as bars:
            stats = ReadStats(strict=strict, skip_bad=skip_bad)
            keys, lengths, per_source = _scan(srcs, stats, seed, bars)
            is_val = _choose_val(keys, val_fraction, val_docs)

            def docs() -> Iterator[tuple[bool, Document]]:  # later passes: same documents, no warnings
                quiet = ReadStats(strict=strict, skip_bad=skip_bad, quiet=True)
                for i, d in enumerate(_iter(srcs, quiet)):
                    if i >= len(keys) or len(d.text.encode()) != lengths[i]:
                        raise DataError("the corpus changed while it was being read; run prepare again")
                    yield bool(is_val[i]), d

            trained = tok is None
            if trained:
                n_train = int(lengths[~is_val].sum())
                task = bars.add_task("training tokenizer", total=n_train + 1)  # +1: the merges

                def train_texts() -> Iterator[str]:
                    for v, d in docs():
                        if not v:
                            bars.advance(task, len(d.text.encode()))
                            yield from _chunks(d.text, _piece_bytes(max_chunk_bytes))
                    bars.update(task, description="computing BPE merges")

                tok = train_tokenizer(train_texts(), vocab_size, min_frequency)
                bars.update(task, description="trained tokenizer", completed=n_train + 1)
            splits = _encode(tok, docs(), tmp, int(lengths.sum()), len(keys), bars, max_chunk_bytes)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        save_tokenizer(tok, tmp)
        meta = _meta(splits, vocab, per_source, stats, seed, val_fraction, val_docs, trained, tokenizer,
                     min_frequency)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        result["meta"] = meta

    write_dir(out, build, kind=TOKENS, overwrite=overwrite)
    meta = result["meta"]
    if progress:
        Console().print(summary_table(meta, title=f"wrote {out}"))
    return meta


def _sources(sources, text_field: str) -> list[Source]:
    if isinstance(sources, (str, os.PathLike, Source)):
        sources = [sources]
    srcs = [s if isinstance(s, Source) else Source(s, text_field) for s in sources]
    if not srcs:
        raise DataError("no sources given; name at least one (e.g. 'shakespeare' or a directory)")
    return srcs


def _iter(srcs: list[Source], stats: ReadStats) -> Iterator[Document]:
    for s in srcs:
        yield from s.documents(stats)


def _given_tokenizer(tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        tok, where = tokenizer, "the tokenizer"
    else:
        where = str(tokenizer)
        path = Path(tokenizer)
        if not (path if path.suffix == ".json" else path / "tokenizer.json").is_file():
            raise DataError(f"--tokenizer {where}: no tokenizer.json there; give a tokenizer.json, a "
                            "directory holding one, or omit --tokenizer to train one")
        try:
            tok = load_tokenizer(path)
        except MoelabError as e:
            raise DataError(str(e)) from None
    check_layout(tok, where)
    return tok


def _doc_key(seed: int, index: int, origin: str) -> int:
    h = hashlib.blake2b(f"{seed}\0{index}\0{origin}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def _scan(srcs, stats, seed, bars) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Pass 1: a split key and a byte length per document, and per-source counts."""
    task = bars.add_task("reading", total=None)
    keys, lengths, per_source = [], [], []
    for s in srcs:
        n0, b0, f0 = len(keys), sum(lengths), len(stats.skipped_files)
        for d in s.documents(stats):
            keys.append(_doc_key(seed, len(keys), d.origin))
            lengths.append(len(d.text.encode()))
            bars.advance(task, lengths[-1])
        per_source.append({"source": s.spec, "kind": s.kind, "documents": len(keys) - n0,
                           "bytes": sum(lengths) - b0, "skipped_files": len(stats.skipped_files) - f0})
    bars.update(task, total=sum(lengths), description=f"read {len(keys):,} documents")
    if not keys:
        skipped = f" ({len(stats.skipped_files)} files skipped)" if stats.skipped_files else ""
        raise DataError(f"the corpus is empty: {', '.join(s.spec for s in srcs)} gave no documents{skipped}")
    return np.array(keys, dtype=np.uint64), np.array(lengths, dtype=np.int64), per_source


def _choose_val(keys: np.ndarray, val_fraction: float, val_docs: int | None) -> np.ndarray:
    n = len(keys)
    n_val = val_docs if val_docs is not None else round(val_fraction * n)
    if val_docs is None and val_fraction > 0:
        if n >= 2:
            n_val = max(n_val, 1)
        else:
            warnings.warn("the corpus is one document, so the val split is empty", DataWarning, stacklevel=3)
    if n_val >= n and n_val > 0:
        raise DataError(f"the validation split would take {n_val} of the {n} documents; "
                        "lower --val-fraction / --val-docs or add documents")
    is_val = np.zeros(n, dtype=bool)
    is_val[np.argsort(keys, kind="stable")[:n_val]] = True
    return is_val


#: An ASCII whitespace character before a word or punctuation (not before a digit: the Digits pre-tokenizer
#: leaves a whitespace run before a number whole). Cutting the text just before it keeps the tokens.
_CUT = re.compile(r"[ \t\n\r\f\v](?=[^\s\d])")


def _chunks(text: str, limit: int) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` UTF-8 bytes that concatenate back to it.

    Each piece ends just before the last ASCII whitespace character that is followed by a character that
    is neither a space nor a number, in the second half of the budget. The byte-level pre-tokenizer of
    moelab tokenizers splits words there anyway (a word takes the one space before it; a run of whitespace
    leaves its last character to the word), so the tokens are those of the whole text. A piece with no such place (one huge "word") is cut
    at the byte limit, which may change the one or two tokens at the cut; so may a given tokenizer with
    another pre-tokenizer (one that adds a prefix space to every input, say).
    """
    if len(text) <= limit // 4 or len(text.encode()) <= limit:
        yield text
        return
    start, n = 0, len(text)
    while start < n:
        end = min(n, start + limit)                       # a character is at least one byte
        size = len(text[start:end].encode())
        while size > limit:                               # multi-byte text: shrink to the byte budget
            end = start + max(1, (end - start) * limit // size - 1)
            size = len(text[start:end].encode())
        if end < n:
            end = _last_cut(text, start + max(1, (end - start) // 2), end) or end
        yield text[start:end]
        start = end


def _piece_bytes(max_chunk_bytes: int) -> int:
    return max(_MIN_CHUNK_BYTES, max_chunk_bytes // _PIECES_PER_CHUNK)


def _last_cut(text: str, lo: int, hi: int) -> int | None:
    """The last position in ``[lo, hi]`` where :data:`_CUT` matches, searching back from ``hi``."""
    width = 4096
    while True:
        a = max(lo, hi - width)
        cut = None
        for m in _CUT.finditer(text, a, min(len(text), hi + 2)):
            if m.start() <= hi and not unicodedata.category(text[m.start() + 1]).startswith("N"):
                cut = m.start()
        if cut is not None or a == lo:
            return cut
        width *= 16


def _encode(tok: Tokenizer, docs: Iterator[tuple[bool, Document]], tmp: Path, total_bytes: int,
            n_docs: int, bars, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> dict:
    """Pass 3: encode every document, append its tokens + EOS to its split's .bin, record offsets.

    At most ``max_chunk_bytes`` of text (and ``_BATCH_BYTES``) go to one ``encode_batch`` call: a long
    document is encoded in pieces (:func:`_chunks`) whose ids are written one after another.
    """
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    task = bars.add_task("tokenising", total=total_bytes)
    files = {s: (tmp / f"{s}.bin").open("wb") for s in SPLITS}
    acc = {s: {"offsets": [0], "bytes": 0, "pending": 0} for s in SPLITS}
    budget = min(_BATCH_BYTES, max_chunk_bytes)
    # Text that happens to spell a special token ("<｜end▁of▁sentence｜>") is encoded as its bytes, so
    # only the EOS we append marks a document end.
    tok.encode_special_tokens = True
    try:
        # batch items: (is_val, piece of text, its UTF-8 bytes, the document's bytes on its last piece else None)
        batch: list[tuple[bool, str, int, int | None]] = []
        size = 0
        for is_val, d in docs:
            pieces = _chunks(d.text, _piece_bytes(max_chunk_bytes))
            piece = next(pieces)
            doc_bytes = 0
            while piece is not None:
                following = next(pieces, None)
                n_bytes = len(piece.encode())
                doc_bytes += n_bytes
                if batch and size + n_bytes > budget:
                    _write_batch(tok, batch, files, acc, dtype, bars, task)
                    batch, size = [], 0
                batch.append((is_val, piece, n_bytes, doc_bytes if following is None else None))
                size += n_bytes
                piece = following
        _write_batch(tok, batch, files, acc, dtype, bars, task)
    finally:
        tok.encode_special_tokens = False
        for f in files.values():
            f.close()
    n_seen = sum(len(a["offsets"]) - 1 for a in acc.values())
    if n_seen != n_docs:
        raise DataError("the corpus changed while it was being read; run prepare again")
    splits = {}
    for s in SPLITS:
        offsets = np.array(acc[s]["offsets"], dtype=np.int64)
        np.save(tmp / f"{s}.idx.npy", offsets)
        splits[s] = {"documents": len(offsets) - 1, "tokens": int(offsets[-1]), "bytes": acc[s]["bytes"]}
    splits["dtype"] = dtype.name
    return splits


def _write_batch(tok, batch, files, acc, dtype, bars, task) -> None:
    """Encode a batch of pieces and append their ids; a document's last piece adds its EOS and offset."""
    if not batch:
        return
    encodings = tok.encode_batch([text for _, text, _, _ in batch], add_special_tokens=False)
    for (is_val, _, n_bytes, doc_bytes), enc in zip(batch, encodings, strict=True):
        split = "val" if is_val else "train"
        a, out = acc[split], files[split]
        last = doc_bytes is not None
        ids = np.empty(len(enc.ids) + last, dtype=dtype)
        ids[:len(enc.ids)] = enc.ids
        if last:
            ids[-1] = EOS_ID
        out.write(ids.tobytes())
        a["pending"] += len(ids)
        if last:
            a["offsets"].append(a["offsets"][-1] + a["pending"])
            a["pending"] = 0
            a["bytes"] += doc_bytes
        bars.advance(task, n_bytes)


def _meta(splits, vocab, per_source, stats, seed, val_fraction, val_docs, trained, tokenizer,
          min_frequency) -> dict:
    dtype = splits.pop("dtype")
    for s in splits.values():
        s["bytes_per_token"] = _ratio(s["bytes"], s["tokens"])
    total_b = sum(s["bytes"] for s in splits.values())
    total_t = sum(s["tokens"] for s in splits.values())
    return {
        "format": FORMAT, "dtype": dtype, "vocab_size": vocab,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "splits": splits,
        "bytes_per_token": {"val": splits["val"]["bytes_per_token"], "overall": _ratio(total_b, total_t)},
        "sources": per_source,
        "skipped_files": len(stats.skipped_files), "skipped_lines": stats.skipped_lines,
        "skipped_paths": stats.skipped_files[:100],
        "seed": seed, "val_fraction": val_fraction if val_docs is None else None, "val_docs": val_docs,
        "tokenizer": ({"trained": True, "min_frequency": min_frequency} if trained
                      else {"trained": False, "from": str(tokenizer) if not isinstance(tokenizer, Tokenizer)
                            else None}),
    }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


class _NoBars:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(console: Console, enabled: bool):
    if not enabled:
        return _NoBars()
    return Progress(SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(), DownloadColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _count(n: int | None, what: str) -> str:
    return f" · {n} {what}{'s' if n != 1 else ''} skipped" if n else ""


def summary_table(meta: dict, title: str | None = None) -> Table:
    """Documents, bytes, tokens and bytes/token per split, as a rich Table."""
    t = Table(title=title, title_justify="left",
              caption=f"vocab {meta['vocab_size']:,} · {meta['dtype']} · seed {meta['seed']}"
              + _count(meta.get("skipped_files"), "file") + _count(meta.get("skipped_lines"), "line"),
              caption_justify="left")
    t.add_column("split", style="bold")
    for name in ("documents", "bytes", "tokens", "bytes/token"):
        t.add_column(name, justify="right")
    rows = [(s, meta["splits"][s]) for s in SPLITS]
    total = {k: sum(v[k] for _, v in rows) for k in ("documents", "bytes", "tokens")}
    for name, s in [*rows, ("total", total)]:
        bpt = _ratio(s["bytes"], s["tokens"])
        t.add_row(name, f"{s['documents']:,}", f"{s['bytes']:,}", f"{s['tokens']:,}",
                  "-" if bpt is None else f"{bpt:.3f}", end_section=name == "val")
    return t


# -- reading --------------------------------------------------------------------------------------------

def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of a token directory; a DataError if ``path`` is not one."""
    d = Path(path)
    how = f"create one with `moelab data prepare SOURCE --out {d}`"
    if not d.is_dir():
        raise DataError(f"{d} is not a directory; {how}")
    try:
        meta = json.loads((d / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{d} is not a moelab token directory (no meta.json); {how}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {d / 'meta.json'}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{d / 'meta.json'} has format {got!r}, not {FORMAT!r}; {how}")
    return meta


class TokenData:
    """One split of a token directory, memory-mapped read-only.

    Args:
        path: a directory written by :func:`prepare`.
        split: ``train`` or ``val``.
    Attributes:
        tokens: uint16/uint32 [N] (a read-only numpy memmap); n_tokens: N;
        doc_offsets: int64 [D + 1]; meta: the meta.json dict; bytes_per_token: bytes / tokens of the split.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path, self.split = Path(path), split
        self.meta = meta = read_meta(self.path)
        if split not in meta.get("splits", {}):
            raise DataError(f"unknown split {split!r}; {self.path} has {', '.join(meta.get('splits', {}))}")
        info = meta["splits"][split]
        dtype = np.dtype(meta["dtype"])
        bin_path, idx_path = self.path / f"{split}.bin", self.path / f"{split}.idx.npy"
        try:
            size = bin_path.stat().st_size
            self.doc_offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot read the {split} split ({e}); prepare it again") from None
        n = info["tokens"]
        if size != n * dtype.itemsize or len(self.doc_offsets) != info["documents"] + 1 \
                or (n and int(self.doc_offsets[-1]) != n):
            raise DataError(f"{self.path}: {split}.bin / {split}.idx.npy do not match meta.json "
                            "(truncated or overwritten?); prepare it again")
        # np.memmap refuses an empty file; an empty split is a valid (if useless) state.
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)
        self.n_tokens = n
        self.bytes_per_token = info.get("bytes_per_token")

    def __repr__(self) -> str:
        return f"TokenData({str(self.path)!r}, {self.split!r}: {self.n_tokens:,} tokens, " \
               f"{len(self.doc_offsets) - 1:,} documents)"

    def __len__(self) -> int:
        return self.n_tokens

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``, ending with EOS."""
        return np.asarray(self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]])

    def _need(self, seq_len: int, batch_size: int) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        if self.n_tokens < seq_len + 1:
            raise DataError(f"the {self.split} split of {self.path} has {self.n_tokens:,} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}; use a shorter sequence or more data"
                            + (" (or a larger --val-fraction)" if self.split == "val" else ""))

    def batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """B windows at random offsets, a pure function of ``(seed, step, micro)``.

        Windows may cross document boundaries (documents are separated by EOS). Under data parallelism,
        give each rank its own ``micro`` (e.g. ``rank * grad_accum + micro``).
        Returns x, y: int64 [B, T], y[:, t] == x[:, t + 1] (the next token).
        """
        self._need(seq_len, batch_size)
        if min(step, micro, seed) < 0:
            raise DataError(f"step, micro and seed must be >= 0 (got {step}, {micro}, {seed})")
        rng = np.random.default_rng([seed, step, micro])
        starts_B = rng.integers(0, self.n_tokens - seq_len, size=batch_size)
        return self._windows(starts_B, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows in order: window k is x = tokens[kT : kT+T], y = tokens[kT+1 : kT+T+1].

        The targets of all windows tile tokens[1 : W*T + 1] exactly once (W = (N - 1) // T windows; fewer
        than T tokens at the end are left out). The last batch may have fewer than B rows.
        """
        self._need(seq_len, batch_size)
        n_windows = self.n_eval_windows(seq_len)
        n_batches = -(-n_windows // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            k = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows))
            yield self._windows(k * seq_len, seq_len)

    def n_eval_windows(self, seq_len: int) -> int:
        return max(self.n_tokens - 1, 0) // seq_len

    def _windows(self, starts_B: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx_BT1 = starts_B[:, None] + np.arange(seq_len + 1)  # [B, T+1]
        w_BT1 = torch.from_numpy(self.tokens[idx_BT1].astype(np.int64))
        return w_BT1[:, :-1].contiguous(), w_BT1[:, 1:].contiguous()
