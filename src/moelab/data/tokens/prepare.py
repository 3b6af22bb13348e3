"""``prepare``: corpora -> a token directory (tokenizer files, ``train/val.bin``, offsets, ``meta.json``).

Three passes over the corpus: read (count documents, choose the val split, report skips), train the
tokenizer on the train documents (unless one is given), encode (:mod:`~moelab.data.tokens.encode`).

The split is by whole document: document i (0-based, in reading order) goes to val when its key
``blake2b(seed, i, origin)`` is among the ``n_val`` smallest, ``n_val = round(val_fraction * n)``
(at least 1 when there are two documents or more) or ``val_docs``. The tokenizer, when trained here,
sees the train documents only, so val bytes/token is an honest held-out number.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from tokenizers import Tokenizer

from moelab.common.atomic import TOKENS, check_output_dir, write_dir
from moelab.common.progress import Bars
from moelab.data.fim import FimSettings
from moelab.data.sources import DataWarning, Document, ReadStats, Source
from moelab.data.tokenizer import (
    check_layout,
    check_vocab_size,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from moelab.data.tokens.encode import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, chunks, encode_splits, piece_bytes
from moelab.data.tokens.meta import BOS_ID, EOS_ID, FORMAT, PAD_ID, bytes_per_token, summary_table
from moelab.errors import DataError, MoelabError


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
    fim: FimSettings | None = None,
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
    or two tokens at that cut (see :func:`chunks`).

    ``fim``: fill-in-the-middle for the train split (:mod:`moelab.data.fim`; the val split stays
    left-to-right, so its perplexity measures left-to-right ability); ``meta.json`` records the settings,
    how many documents were rearranged and how many drawn ones were too short to cut.
    """
    if max_chunk_bytes < MIN_CHUNK_BYTES:
        raise DataError(f"max_chunk_bytes must be at least {MIN_CHUNK_BYTES} (got {max_chunk_bytes})")
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
                            yield from chunks(d.text, piece_bytes(max_chunk_bytes))
                    bars.update(task, description="computing BPE merges")

                tok = train_tokenizer(train_texts(), vocab_size, min_frequency)
                bars.update(task, description="trained tokenizer", completed=n_train + 1)
            splits = encode_splits(tok, docs(), tmp, int(lengths.sum()), len(keys), bars, max_chunk_bytes, fim)
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


def _meta(splits, vocab, per_source, stats, seed, val_fraction, val_docs, trained, tokenizer,
          min_frequency) -> dict:
    dtype = splits.pop("dtype")
    fim = splits.pop("fim", None)
    for s in splits.values():
        s["bytes_per_token"] = bytes_per_token(s["bytes"], s["tokens"])
    total_b = sum(s["bytes"] for s in splits.values())
    total_t = sum(s["tokens"] for s in splits.values())
    return {
        "format": FORMAT, "dtype": dtype, "vocab_size": vocab,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "splits": splits,
        "bytes_per_token": {"val": splits["val"]["bytes_per_token"],
                            "overall": bytes_per_token(total_b, total_t)},
        "sources": per_source,
        "skipped_files": len(stats.skipped_files), "skipped_lines": stats.skipped_lines,
        "skipped_paths": stats.skipped_files[:100],
        "seed": seed, "val_fraction": val_fraction if val_docs is None else None, "val_docs": val_docs,
        **({"fim": fim} if fim is not None else {}),
        "tokenizer": ({"trained": True, "min_frequency": min_frequency} if trained
                      else {"trained": False, "from": str(tokenizer) if not isinstance(tokenizer, Tokenizer)
                            else None}),
    }


def _progress(console: Console, enabled: bool):
    """The bars of the three passes: byte counts (``DownloadColumn``) and a spinner, kept on screen."""
    if not enabled:
        return Bars(enabled=False)
    return Bars(console=console, transient=False, columns=(
        SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
        TimeRemainingColumn()))
