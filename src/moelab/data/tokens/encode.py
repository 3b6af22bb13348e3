"""The chunked encoder: documents -> token ids appended to ``train.bin`` / ``val.bin`` with offsets.

Every document becomes its tokens then EOS (id 1) in its split's ``.bin`` (uint16 if the vocabulary has at
most 65535 tokens, else uint32), and ``{split}.idx.npy`` holds int64 ``[n_docs + 1]`` offsets: document d
is ``bin[idx[d]:idx[d+1]]``. At most ``max_chunk_bytes`` of text go to one ``encode_batch`` call: a long
document is cut (:func:`chunks`) just before a whitespace character that precedes a word, which leaves
its tokens unchanged, and its pieces are encoded one after another.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from moelab.data.fim import FimSettings, fim_split, sentinel_ids
from moelab.data.sources import Document
from moelab.data.tokenizer import literal_text_tokenizer
from moelab.data.tokens.meta import EOS_ID, SPLITS
from moelab.errors import DataError

_BATCH_BYTES = 1 << 20  # documents handed to encode_batch at once (~1 MB of text)
#: Default of ``max_chunk_bytes``: the most text encoded at once. The tokenizer holds ~250 bytes per byte of
#: text while encoding (ids, offsets, token strings), so 1 MiB bounds encoding at ~0.3 GB.
MAX_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 1 << 10
#: A long document is cut into pieces of max_chunk_bytes / 8, so that one encode_batch call of at most
#: max_chunk_bytes encodes several pieces in parallel.
_PIECES_PER_CHUNK = 8


#: An ASCII whitespace character before a word or punctuation (not before a digit: the Digits pre-tokenizer
#: leaves a whitespace run before a number whole). Cutting the text just before it keeps the tokens.
_CUT = re.compile(r"[ \t\n\r\f\v](?=[^\s\d])")


def chunks(text: str, limit: int) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` UTF-8 bytes that concatenate back to it.

    Each piece ends just before the last ASCII whitespace character that is followed by a character that
    is neither a space nor a number, in the second half of the budget. The byte-level pre-tokenizer of
    moelab tokenizers splits words there anyway (a word takes the one space before it; a run of whitespace
    leaves its last character to the word), so the tokens are those of the whole text. A piece with no
    such place (one huge "word") is cut at the byte limit, which may change the one or two tokens at the
    cut; so may a given tokenizer with another pre-tokenizer (one that adds a prefix space to every
    input, say).
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


def piece_bytes(max_chunk_bytes: int) -> int:
    """The size of the pieces a long document is cut into (:func:`chunks`)."""
    return max(MIN_CHUNK_BYTES, max_chunk_bytes // _PIECES_PER_CHUNK)


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


def encode_splits(tok: Tokenizer, docs: Iterator[tuple[bool, Document]], tmp: Path, total_bytes: int,
            n_docs: int, bars, max_chunk_bytes: int = MAX_CHUNK_BYTES, fim: FimSettings | None = None) -> dict:
    """Pass 3: encode every document, append its tokens + EOS to its split's .bin, record offsets.

    At most ``max_chunk_bytes`` of text (and ``_BATCH_BYTES``) go to one ``encode_batch`` call: a long
    document is encoded in pieces (:func:`chunks`) whose ids are written one after another. With ``fim``,
    train documents drawn for fill-in-the-middle (:mod:`moelab.data.fim`, by document index) are written
    ``<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle`` + EOS, each piece tokenized on its own.
    """
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    sentinels = sentinel_ids(tok) if fim is not None and fim.fim_rate > 0 else None
    fim_counts = {"documents": 0, "too_short": 0}
    task = bars.add_task("tokenising", total=total_bytes)
    files = {s: (tmp / f"{s}.bin").open("wb") for s in SPLITS}
    acc = {s: {"offsets": [0], "bytes": 0, "pending": 0} for s in SPLITS}
    budget = min(_BATCH_BYTES, max_chunk_bytes)
    # Text that happens to spell a special token ("<｜end▁of▁sentence｜>") is encoded as its bytes, so
    # only the EOS we append (and the FIM sentinels we insert) are special tokens.
    tok = literal_text_tokenizer(tok)
    tok.encode_special_tokens = True
    try:
        # batch items: (is_val, piece of text, its UTF-8 bytes, the document's bytes on its last piece else
        # None, ids written before the piece's tokens: a FIM sentinel)
        batch: list[tuple[bool, str, int, int | None, list[int]]] = []
        size = 0
        for index, (is_val, d) in enumerate(docs):
            parts: list[tuple[int | None, str]] = [(None, d.text)]
            if sentinels is not None and not is_val:
                drawn, split = fim_split(d.text, fim, index)
                fim_counts["documents"] += split is not None
                fim_counts["too_short"] += drawn and split is None
                if split is not None:
                    parts = [(sentinels[sentinel], text) for sentinel, text in split.pieces()]
            seq = [([sid] if k == 0 and sid is not None else [], piece)
                   for sid, text in parts for k, piece in enumerate(chunks(text, piece_bytes(max_chunk_bytes)))]
            doc_bytes = 0
            for k, (pre, piece) in enumerate(seq):
                n_bytes = len(piece.encode())
                doc_bytes += n_bytes
                if batch and size + n_bytes > budget:
                    _write_batch(tok, batch, files, acc, dtype, bars, task)
                    batch, size = [], 0
                batch.append((is_val, piece, n_bytes, doc_bytes if k == len(seq) - 1 else None, pre))
                size += n_bytes
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
    if fim is not None:
        splits["fim"] = {**fim.model_dump(), **fim_counts}
    return splits


def _write_batch(tok, batch, files, acc, dtype, bars, task) -> None:
    """Encode a batch of pieces and append their ids; a document's last piece adds its EOS and offset."""
    if not batch:
        return
    encodings = tok.encode_batch([text for _, text, _, _, _ in batch], add_special_tokens=False)
    for (is_val, _, n_bytes, doc_bytes, pre), enc in zip(batch, encodings, strict=True):
        split = "val" if is_val else "train"
        a, out = acc[split], files[split]
        last = doc_bytes is not None
        ids = np.empty(len(pre) + len(enc.ids) + last, dtype=dtype)
        ids[:len(pre)] = pre
        ids[len(pre):len(pre) + len(enc.ids)] = enc.ids
        if last:
            ids[-1] = EOS_ID
        out.write(ids.tobytes())
        a["pending"] += len(ids)
        if last:
            a["offsets"].append(a["offsets"][-1] + a["pending"])
            a["pending"] = 0
            a["bytes"] += doc_bytes
        bars.advance(task, n_bytes)
