"""Perplexity and bits per byte of a causal LM on a text source or a token directory.

    from moelab.evaluate.perplexity import perplexity
    r = perplexity(model, tokenizer, "shakespeare", seq_len=512, max_tokens=20_000)
    r.ppl, r.bpb, r.tokens, r.bytes

**What is scored.** The text is laid out as one token stream ``sep d_1 sep d_2 ... sep d_n``: each
document's tokens, each preceded by a separator (:func:`moelab.evaluate.lm.separator_id`: EOS for moelab
models, BOS for others), which gives every document's first token something to be predicted from.
The targets are the document tokens only; separators are context, never targets. So

    loss = NLL / tokens (nats),  ppl = exp(loss),  bpb = NLL / (ln 2 · bytes)

where ``bytes`` is the UTF-8 byte count of exactly the scored text (``bpb = log2(ppl) · tokens / bytes``).
A token directory is scored the same way (stream ``EOS + split tokens``, EOS targets left out); its bytes
come from the byte-level vocabulary, so for a whole split they equal ``meta.json``'s bytes. Training's
``val_bpb`` also counts the EOS predictions, so it differs slightly from this number.

**Windows.** The model sees at most ``seq_len`` tokens at once. Window k feeds ``ids[kS : kS + L]``
(``L = seq_len``, ``S = stride``) and scores only the positions no earlier window scored: with
``S = L`` (the default) windows do not overlap and each token is predicted from the tokens since the
start of its window; with ``S < L`` every window but the first scores its last ``S`` tokens given
``L - S`` tokens of context (sliding evaluation: lower, fairer perplexity, ``L / S`` times the compute).

``max_tokens`` stops after that many scored tokens; when the cut falls inside a document, the bytes of
its scored prefix come from the tokenizer's character offsets (exact unless the cut splits a multi-byte
character between two byte-level tokens).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.common.progress import Bars
from moelab.errors import DataError, MoelabError
from moelab.evaluate.lm import separator_id
from moelab.lm.logits import context_length, forward_logits, model_device
from moelab.lm.nll import IGNORE, token_nll

#: Default window when neither ``seq_len`` nor a shorter model context is given (keeps fp32 logits small).
DEFAULT_MAX_SEQ_LEN = 2048
#: With ``batch_size=None``, as many windows per forward pass as keep the fp32 logits under this size.
LOGITS_BUDGET_BYTES = 1 << 29


@dataclass
class Stream:
    """A token stream to score.

    Attributes:
        ids: int64 [N]; ``ids[0]`` is a separator (never a target).
        scored: bool [N]; which positions are targets.
        bytes: UTF-8 bytes of the scored text. documents: how many documents (or parts) it holds.
    """

    ids: np.ndarray
    scored: np.ndarray
    bytes: int
    documents: int

    @property
    def tokens(self) -> int:
        return int(self.scored.sum())


@dataclass
class PerplexityResult:
    """Totals of one evaluation; ``loss``, ``ppl``, ``bpb`` and ``bytes_per_token`` derive from them."""

    nll: float        # summed negative log-likelihood of the scored tokens, nats
    tokens: int       # scored tokens
    bytes: int        # UTF-8 bytes of the scored text
    documents: int
    seq_len: int
    stride: int
    windows: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "ppl": self.ppl, "bpb": self.bpb,
                "bytes_per_token": self.bytes_per_token}


# -- streams ----------------------------------------------------------------------------------------

def text_stream(tokenizer, texts: Iterable[str], sep_id: int, max_tokens: int | None = None) -> Stream:
    """The stream ``sep d_1 sep d_2 ...`` of ``texts`` (empty texts are skipped), cut at ``max_tokens``
    scored tokens."""
    ids: list[int] = [sep_id]
    scored: list[bool] = [False]
    n_bytes = n_docs = n_tokens = 0
    for text in texts:
        if not text:
            continue
        if max_tokens is not None and n_tokens >= max_tokens:
            break
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=max_tokens is not None)
        doc = list(enc.input_ids)
        if not doc:
            continue
        doc_bytes = len(text.encode("utf-8"))
        if max_tokens is not None and n_tokens + len(doc) > max_tokens:
            keep = max_tokens - n_tokens
            doc_bytes = len(text[:enc.offset_mapping[keep - 1][1]].encode("utf-8"))
            doc = doc[:keep]
        if n_docs:
            ids.append(sep_id)
            scored.append(False)
        ids.extend(doc)
        scored.extend([True] * len(doc))
        n_tokens += len(doc)
        n_bytes += doc_bytes
        n_docs += 1
    return Stream(np.asarray(ids, dtype=np.int64), np.asarray(scored, dtype=bool), n_bytes, n_docs)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for, int64 ``[V]`` (0 for special tokens).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast tokenizer whose vocabulary is
    byte-level (every moelab tokenizer, GPT-2-style BPEs): each symbol of a token string is one byte.
    """
    from tokenizers import pre_tokenizers

    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, i in vocab.items():
        if token in special:
            continue
        if not set(token) <= alphabet:
            raise DataError("this tokenizer is not byte-level, so the bytes of a token directory cannot be "
                            "counted; score the text source instead")
        out[i] = len(token)
    return out


def token_dir_stream(path: str | os.PathLike, tokenizer, split: str = "val",
                     max_tokens: int | None = None) -> Stream:
    """The stream ``EOS + tokens`` of one split of a token directory; EOS positions are not targets.

    The directory's tokenizer must be the model's (same vocabulary), else a :class:`DataError`.
    """
    from tokenizers import Tokenizer

    from moelab.data.tokens import EOS_ID, TokenData

    data = TokenData(path, split)
    try:
        dir_tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exceptions)
        raise DataError(f"cannot read {Path(path) / 'tokenizer.json'}: {e}") from None
    if dir_tok.get_vocab(with_added_tokens=True) != tokenizer.get_vocab():
        raise DataError(f"{path} was tokenised with a different tokenizer than the model's; score the text "
                        "source instead, or prepare the data with --tokenizer MODEL_DIR")
    if data.n_tokens == 0:
        raise DataError(f"the {split} split of {path} is empty; nothing to score")
    tokens = np.asarray(data.tokens, dtype=np.int64)
    ids = np.concatenate(([EOS_ID], tokens))
    scored = ids != EOS_ID
    scored[0] = False
    if max_tokens is not None and scored.sum() > max_tokens:
        last = int(np.flatnonzero(scored)[max_tokens - 1])
        ids, scored = ids[:last + 1], scored[:last + 1]
    n_bytes = int(token_byte_lengths(dir_tok)[ids[scored]].sum())
    docs = int((scored[1:] & (ids[:-1] == EOS_ID)).sum())    # documents that start in the stream
    return Stream(ids, scored, n_bytes, docs)


def is_token_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "meta.json").is_file() and any(p.glob("*.bin"))


# -- scoring ----------------------------------------------------------------------------------------

def plan_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of ``n`` tokens: ``(begin, end, prev)`` feeds ``ids[begin:end]`` and scores
    positions ``prev+1 .. end`` (each position 1..n-1 exactly once)."""
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise MoelabError(f"need seq_len >= 1 and 1 <= stride <= seq_len (got seq_len {seq_len}, stride {stride})")
    out, prev, begin = [], 0, 0
    while prev < n - 1:
        end = min(begin + seq_len, n - 1)
        out.append((begin, end, prev))
        prev, begin = end, begin + stride
    return out


@torch.inference_mode()
def score_stream(model, stream: Stream, seq_len: int, stride: int | None = None, batch_size: int | None = None,
                 progress: bool = False) -> PerplexityResult:
    """Summed NLL of ``stream``'s targets under ``model``, window by window (see the module docstring).

    ``batch_size`` windows go through the model at once (None: as many as keep the ``[B, T, V]`` fp32
    logits under 512 MiB, at most 16).
    """
    if stream.tokens == 0:
        raise DataError("there is no text to score (the source is empty)")
    if batch_size is None:
        vocab = int(getattr(model.config, "vocab_size", 0) or 50_000)
        batch_size = max(1, min(16, LOGITS_BUDGET_BYTES // (4 * seq_len * vocab)))
    if batch_size < 1:
        raise MoelabError(f"batch_size must be >= 1 (got {batch_size})")
    stride = seq_len if stride is None else stride
    plan = plan_windows(len(stream.ids), seq_len, stride)
    ids = torch.from_numpy(stream.ids)
    scored = torch.from_numpy(stream.scored)
    dev = model_device(model)
    was_training = model.training
    model.eval()
    nll = 0.0
    bar = Bars(progress)
    try:
        with bar:
            task = bar.add_task("perplexity", total=len(plan))
            for s in range(0, len(plan), batch_size):
                chunk = plan[s:s + batch_size]
                T = max(end - begin for begin, end, _ in chunk)
                x_BT = torch.zeros((len(chunk), T), dtype=torch.long)  # right padding: causal, never attended
                # targets: the positions this window scores (prev+1 .. end) that are scored tokens;
                # padding, context already scored by an earlier window, and separators carry none
                y_BT = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
                for r, (begin, end, prev) in enumerate(chunk):
                    x_BT[r, :end - begin] = ids[begin:end]
                    pos = torch.arange(prev + 1, end + 1)                  # logits pos - begin - 1 predict pos
                    y_BT[r, pos - begin - 1] = torch.where(scored[pos], ids[pos], IGNORE)
                logits_BTV = forward_logits(model, x_BT.to(dev))
                # per-token fp32, summed in fp64: a stream may hold millions of targets
                nll += token_nll(logits_BTV, y_BT.to(dev), torch.float64)[0]
                bar.advance(task, len(chunk))
    finally:
        model.train(was_training)
    return PerplexityResult(nll=nll, tokens=stream.tokens, bytes=stream.bytes, documents=stream.documents,
                            seq_len=seq_len, stride=stride, windows=len(plan))


def resolve_seq_len(model, seq_len: int | None) -> int:
    ctx = context_length(model)
    if seq_len is None:
        return min(ctx, DEFAULT_MAX_SEQ_LEN)
    if seq_len < 1:
        raise MoelabError(f"seq_len must be >= 1 (got {seq_len})")
    if seq_len > ctx:
        raise MoelabError(f"seq_len {seq_len} is longer than the model's context ({ctx} tokens); use "
                          f"--seq-len {ctx} or less")
    return seq_len


def check_source(source, split: str = "val", text_field: str = "text") -> None:
    """Raise a :class:`DataError` unless ``source`` exists and holds some text (cheap: stops at the first
    non-empty document), so that a command fails before it loads a model."""
    from moelab.data.sources import ReadStats, Source

    if is_token_dir(source):
        from moelab.data.tokens import TokenData

        if TokenData(source, split).n_tokens == 0:
            raise DataError(f"the {split} split of {source} is empty; nothing to score")
        return
    src, stats = Source(source, text_field), ReadStats(quiet=True)
    if not any(d.text for d in src.documents(stats)):
        skipped = (f"; skipped {len(stats.skipped_files):,} file(s) that are not UTF-8 text, e.g. "
                   f"{stats.skipped_files[0]} (convert them to UTF-8)") if stats.skipped_files else ""
        raise DataError(f"{source} holds no text to score (no non-empty documents){skipped}")


def perplexity(model, tokenizer, source, *, seq_len: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int | None = None, split: str = "val",
               text_field: str = "text",
               progress: bool = False) -> PerplexityResult:
    """Perplexity and bits per byte of ``model`` on ``source``.

    Args:
        source: a token directory (``split`` of it is scored), a source spec for
            :class:`moelab.data.sources.Source` (``shakespeare``, a text/JSONL file, a directory, a glob),
            a ``Source``, or a list of strings.
        seq_len: window length (default: the model's context, at most 2048). stride: see the module
            docstring (default ``seq_len``: non-overlapping windows).
        max_tokens: score at most this many tokens.
    """
    from moelab.data.sources import ReadStats, Source

    seq_len = resolve_seq_len(model, seq_len)
    if max_tokens is not None and max_tokens < 1:
        raise MoelabError(f"max_tokens must be >= 1 (got {max_tokens})")
    if isinstance(source, (list, tuple)):
        stream = text_stream(tokenizer, source, separator_id(model, tokenizer), max_tokens)
    elif not isinstance(source, Source) and is_token_dir(source):
        stream = token_dir_stream(source, tokenizer, split, max_tokens)
    else:
        src = source if isinstance(source, Source) else Source(source, text_field)
        texts = (d.text for d in src.documents(ReadStats()))
        stream = text_stream(tokenizer, texts, separator_id(model, tokenizer), max_tokens)
    if stream.tokens == 0:
        raise DataError(f"{source} holds no text to score (no non-empty documents)")
    return score_stream(model, stream, seq_len, stride, batch_size, progress)


__all__ = ["PerplexityResult", "Stream", "check_source", "is_token_dir", "perplexity", "plan_windows", "score_stream",
           "text_stream", "token_byte_lengths", "token_dir_stream"]
