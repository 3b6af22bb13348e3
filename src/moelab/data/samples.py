"""Datasets -> token sequences, for commands that read a model on data (``moelab analyze ...``).

    samples = load_samples("runs/data/shakespeare", tok, 64, 256, vocab_size=512)    # 64 int64 [T_i]
    for ids_BT in batched(samples, 8): ...                                           # equal lengths stacked

A dataset spec is a token directory (``moelab data prepare``), an SFT JSON Lines file (prompt/completion
or messages; packed rows, or k-shot prompts) or any text source of :mod:`moelab.data.sources`
(``shakespeare``, a directory, a glob, a file); :func:`data_kind` tells which. SFT conversations are
rendered with whatever the model's tokenizer offers (moelab's DeepSeek chat format, the tokenizer's own
chat template, or plain ``User: ... Assistant: ...`` text).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from moelab.errors import DataError


def data_kind(spec: str | os.PathLike) -> str:
    """``tokens`` (a token directory), ``sft`` (JSON Lines with ``prompt``/``messages``) or ``text``."""
    p = Path(spec)
    if p.is_dir() and (p / "meta.json").is_file():
        return "tokens"
    if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        try:
            with open(p, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "")
            obj = json.loads(first) if first else None
        except (OSError, ValueError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict) and ("messages" in obj or "prompt" in obj):
            return "sft"
    return "text"


def check_data(spec: str | os.PathLike, split: str = "val", text_field: str = "text") -> None:
    """Raise a :class:`DataError` unless ``spec`` names data :func:`load_samples` can read (cheap: no
    tokenising), so that a command fails before it loads a model."""
    kind = data_kind(spec)
    if kind == "tokens":
        from moelab.data.tokens import read_meta

        meta_splits = read_meta(spec).get("splits", {})
        if split not in meta_splits:
            raise DataError(f"{spec} has no {split!r} split (it has {', '.join(meta_splits) or 'none'}); "
                            "pass --split train (or another split)")
    elif kind == "text":
        from moelab.data.sources import Source

        Source(spec, text_field)


def dataset_name(spec: str | os.PathLike) -> str:
    """A short label for a dataset spec: the file stem or directory name (``shakespeare`` stays)."""
    p = Path(str(spec).rstrip("/"))
    return p.stem if p.suffix else (p.name or str(spec))


def unique_names(specs: Sequence[str]) -> list[str]:
    """:func:`dataset_name` of each spec, with ``#2``, ``#3``... appended to repeated names."""
    out: list[str] = []
    for s in specs:
        name, k = dataset_name(s), 2
        while name in out:
            name, k = f"{dataset_name(s)}#{k}", k + 1
        out.append(name)
    return out


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the argument itself)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


def _encode(tokenizer, text: str) -> list[int]:
    be = _backend(tokenizer)
    if be is not None:
        return be.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Renderer:
    """Chat messages -> token ids with whatever the tokenizer offers.

    The DeepSeek template of :class:`moelab.data.sft.ChatFormat` when the tokenizer reserves the DeepSeek
    special tokens (every moelab tokenizer does), else the tokenizer's own chat template (SmolLM2 and other
    transformers chat models), else plain ``User: ...\\n\\nAssistant: ...`` text.
    """

    def __init__(self, tokenizer):
        from moelab.data.sft import ChatFormat
        from moelab.data.tokenizer import ASSISTANT, BOS, EOS, USER

        self.tok, self.fmt = tokenizer, None
        be = _backend(tokenizer)
        if be is not None and all(be.token_to_id(t) is not None for t in (BOS, EOS, USER, ASSISTANT)):
            self.fmt = ChatFormat(be, "deepseek")
            self.pad = self.fmt.pad
            return
        self.template = bool(getattr(tokenizer, "chat_template", None))
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
        self.pad = 0 if pad is None else int(pad)

    def _plain(self, messages: list[dict], prompt: bool) -> str:
        parts = []
        for m in messages:
            if m["role"] == "system":
                parts.append(m["content"] + "\n\n")
            elif m["role"] == "user":
                parts.append(f"User: {m['content']}\n\nAssistant: ")
            else:
                parts.append(m["content"] + "\n\n")
        return "".join(parts) if prompt else "".join(parts).rstrip("\n")

    def full(self, messages: list[dict]) -> list[int]:
        """The whole conversation (every assistant turn included)."""
        if self.fmt is not None:
            return self.fmt.render(messages).ids
        if self.template:
            return _encode(self.tok, self.tok.apply_chat_template(messages, tokenize=False))
        return _encode(self.tok, self._plain(messages, False))

    def prompt(self, messages: list[dict]) -> list[int]:
        """The conversation up to where the next assistant turn would start."""
        if self.fmt is not None:
            return self.fmt.prompt_ids(messages)
        if self.template:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return _encode(self.tok, text)
        return _encode(self.tok, self._plain(messages, True))


def load_samples(spec: str | os.PathLike, tokenizer, n: int, seq_len: int, *, seed: int = 0,
                 split: str = "val", shots: int | None = None, text_field: str = "text",
                 vocab_size: int | None = None) -> list[torch.Tensor]:
    """Up to ``n`` token sequences (int64 ``[T_i]``, ``T_i <= seq_len``) from a dataset spec.

    * token directory: ``n`` windows of ``seq_len`` tokens at seeded random offsets of ``split``;
    * SFT JSON Lines: with ``shots = None``, rows of whole examples packed up to ``seq_len`` tokens (trailing
      padding removed; at most as many rows as the file fills); with ``shots = k``, ``n`` k-shot prompts —
      k solved examples then one more question, ending where the answer would start (cut on the left
      to ``seq_len``), so the next token is an answer token (the 3-shot prompts of docs/methods.md §7);
    * anything else is a text source (:class:`moelab.data.sources.Source`): documents drawn in a seeded
      order, each tokenised and cut to a window of ``seq_len`` tokens at a random offset (a shorter
      document is taken whole; fewer than 8 tokens are skipped); with fewer documents than ``n``, each gives
      several non-overlapping windows.

    ``tokenizer`` is the model's (a transformers tokenizer or a ``tokenizers.Tokenizer``); ``vocab_size``,
    when given, checks that every id fits the model.
    """
    if n < 1 or seq_len < 2:
        raise DataError(f"need n >= 1 samples of seq_len >= 2 tokens (got n={n}, seq_len={seq_len})")
    kind = data_kind(spec)
    rng = np.random.default_rng(seed)
    if kind == "tokens":
        from moelab.data.tokens import TokenData, read_meta

        meta_splits = read_meta(spec).get("splits", {})
        if split not in meta_splits:
            raise DataError(f"{spec} has no {split!r} split (it has {', '.join(meta_splits) or 'none'}); "
                            "pass --split train (or another split)")
        x, _ = TokenData(spec, split).batch(n, seq_len, step=0, seed=seed)
        out = list(x)
    elif kind == "sft":
        out = _sft_samples(spec, tokenizer, n, seq_len, rng, seed, shots)
    else:
        out = _text_samples(spec, tokenizer, n, seq_len, rng, text_field)
    if not out:
        raise DataError(f"{spec} gave no token sequences; give a larger dataset or a shorter --seq-len")
    if vocab_size is not None:
        hi = max(int(s.max()) for s in out)
        if hi >= vocab_size:
            raise DataError(f"{spec} holds token id {hi}, outside the model's vocabulary (0..{vocab_size - 1}); "
                            "was it tokenised with this model's tokenizer? Prepare it again with "
                            "`moelab data prepare ... --tokenizer MODEL_DIR`")
    return out


def _sft_samples(spec, tokenizer, n, seq_len, rng, seed, shots) -> list[torch.Tensor]:
    from moelab.data.sft import Example, pack, read_jsonl

    convs = [m for _, m in read_jsonl(spec, skip_hint=None)]     # the analyze commands cannot skip lines
    if not convs:
        raise DataError(f"{spec} holds no examples")
    r = _Renderer(tokenizer)
    if shots is None:
        examples = [Example(ids, list(ids), 0) for ids in (r.full(m) for m in convs)]
        ids, _ = pack(examples, seq_len, r.pad, seed=seed)
        rows = []
        for row in ids[:n, :-1]:
            keep = len(row)
            while keep > 1 and row[keep - 1] == r.pad:
                keep -= 1
            rows.append(torch.from_numpy(row[:keep].copy()))
        return rows
    if shots < 0:
        raise DataError(f"shots must be >= 0 (got {shots})")
    if len(convs) < shots + 1:
        raise DataError(f"{spec} has {len(convs)} examples, fewer than shots + 1 = {shots + 1}; use fewer shots")
    out = []
    for _ in range(n):
        pick = rng.choice(len(convs), size=shots + 1, replace=False)
        msgs = [m for i in pick[:-1] for m in convs[int(i)]]
        query = list(convs[int(pick[-1])])
        while query and query[-1]["role"] == "assistant":     # ask, do not answer
            query.pop()
        ids = r.prompt([m for m in msgs if m["role"] != "system"] + query)[-seq_len:]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def _text_samples(spec, tokenizer, n, seq_len, rng, text_field, max_docs: int = 100_000) -> list[torch.Tensor]:
    from moelab.data.sources import Source

    docs = []
    for d in Source(spec, text_field).documents():
        docs.append(d.text)
        if len(docs) >= max_docs:
            break
    out: list[torch.Tensor] = []
    per_doc = -(-n // max(len(docs), 1))            # a few long documents give several windows each
    for i in rng.permutation(len(docs)):
        ids = _encode(tokenizer, docs[int(i)])
        if len(ids) < 8:
            continue
        if len(ids) <= seq_len:
            out.append(torch.tensor(ids, dtype=torch.long))
        else:                                        # non-overlapping windows at a random shift
            chunks = len(ids) // seq_len
            shift = int(rng.integers(0, len(ids) - chunks * seq_len + 1))
            for c in sorted(rng.choice(chunks, size=min(per_doc, chunks, n - len(out)), replace=False)):
                start = shift + int(c) * seq_len
                out.append(torch.tensor(ids[start:start + seq_len], dtype=torch.long))
        if len(out) >= n:
            break
    return out[:n]


def batched(samples: Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    """Consecutive samples of equal length stacked into ``[B, T]`` batches of at most ``batch_size``
    (``samples`` may be any iterable, e.g. a generator of packed rows)."""
    run: list[torch.Tensor] = []
    for s in samples:
        if run and (len(s) != len(run[0]) or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(s)
    if run:
        yield torch.stack(run)


__all__ = ["batched", "check_data", "data_kind", "dataset_name", "load_samples", "unique_names"]
