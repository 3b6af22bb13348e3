"""Fill-in-the-middle (DeepSeek-Coder-V2, docs/methods.md §11): a document cut into prefix, middle and suffix
and rearranged PSM-style, so the model learns to write a middle from the code around it.

    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>

The sentinels are single special tokens with their exact bytes: bars U+FF5C (``EF BD 9C``), "▁" U+2581
(``E2 96 81``); :mod:`moelab.data.tokenizer` reserves them in every tokenizer moelab trains, and the real
DeepSeek-V3 tokenizer has them at ids 128800–128802. Applied per document **before packing** (so no span
crosses a document boundary) at rate ``fim_rate`` (default 0.5: Coder-V2 Lite; Coder v1 found 0.5 keeps
left-to-right ability; V3 uses 0.1).

Split sampling — marked uncertain in the spec, so a setting with a documented default: two uniform cuts
``0 ≤ i ≤ j ≤ n`` over the document's ``n`` characters (``split = "uniform-chars"``); ``prefix = text[:i]``,
``middle = text[i:j]``, ``suffix = text[j:]``. Each piece is tokenized on its own. Whether a document is
rearranged and where it is cut are a pure function of ``(seed, document index)``, so a prepared corpus is
reproducible. Documents shorter than ``min_chars`` (default 2: nothing to cut) stay left-to-right and are
counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from moelab.data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, literal_text_tokenizer
from moelab.errors import DataError

#: The PSM order: (sentinel, which piece follows it).
PSM = ((FIM_BEGIN, "prefix"), (FIM_HOLE, "suffix"), (FIM_END, "middle"))


class FimSettings(BaseModel):
    """``fim_rate`` of the documents (of the train split) rearranged PSM-style; see the module docstring."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    fim_rate: float = 0.5
    fim_mode: Literal["psm"] = "psm"
    split: Literal["uniform-chars"] = "uniform-chars"
    min_chars: int = 2
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 <= self.fim_rate <= 1.0:
            raise ValueError(f"fim_rate must be in [0, 1] (got {self.fim_rate})")
        if self.min_chars < 2:
            raise ValueError(f"min_chars must be >= 2: a document needs two characters to be cut "
                             f"(got {self.min_chars})")
        if self.seed < 0:
            raise ValueError(f"the FIM seed must be >= 0 (got {self.seed})")
        return self


@dataclass(frozen=True)
class FimSplit:
    prefix: str
    middle: str
    suffix: str

    def pieces(self) -> list[tuple[str, str]]:
        """``[(sentinel, text), ...]`` in PSM order: prefix after BEGIN, suffix after HOLE, middle after END."""
        return [(sentinel, getattr(self, part)) for sentinel, part in PSM]


def fim_split(text: str, settings: FimSettings, index: int) -> tuple[bool, FimSplit | None]:
    """(whether document ``index`` is drawn for FIM, its PSM split); a drawn document shorter than
    ``min_chars`` has no split and stays left-to-right."""
    rng = np.random.Generator(np.random.PCG64([settings.seed, index, 0x46494D]))   # "FIM"
    if rng.random() >= settings.fim_rate:
        return False, None
    n = len(text)
    if n < settings.min_chars:
        return True, None
    i, j = sorted(int(c) for c in rng.integers(0, n + 1, size=2))
    return True, FimSplit(text[:i], text[i:j], text[j:])


def sentinel_ids(tok) -> dict[str, int]:
    """The ids of the three FIM sentinels in ``tok`` (a ``tokenizers.Tokenizer``), or a :class:`DataError`."""
    ids = {s: tok.token_to_id(s) for s in (FIM_BEGIN, FIM_HOLE, FIM_END)}
    missing = [s for s, i in ids.items() if i is None]
    if missing:
        raise DataError(f"the tokenizer has no FIM sentinel {missing[0]!r}; FIM needs a tokenizer with "
                        "<｜fim▁begin｜>, <｜fim▁hole｜> and <｜fim▁end｜> (every moelab tokenizer and "
                        "DeepSeek's have them)")
    return ids


def encode_plain(tok, text: str) -> list[int]:
    """Token ids of ``text``, where text that spells a special or added token (a sentinel, EOS) is encoded as
    its bytes — never as that token (:func:`~moelab.data.tokenizer.literal_text_tokenizer`)."""
    return encode_plain_many(tok, [text])[0]


def encode_plain_many(tok, texts: list[str]) -> list[list[int]]:
    lit = literal_text_tokenizer(tok)
    before = lit.encode_special_tokens
    lit.encode_special_tokens = True
    try:
        return [e.ids for e in lit.encode_batch(texts, add_special_tokens=False)]
    finally:
        lit.encode_special_tokens = before


def fim_prompt_ids(tok, prefix: str, suffix: str) -> list[int]:
    """What infilling sends: ``<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>``; the model writes the
    middle and then EOS."""
    ids = sentinel_ids(tok)
    p, s = encode_plain_many(tok, [prefix, suffix])
    return [ids[FIM_BEGIN], *p, ids[FIM_HOLE], *s, ids[FIM_END]]


def fim_document_ids(tok, split: FimSplit, eos_id: int) -> list[int]:
    """The training tokens of a rearranged document: the prompt, the middle, EOS."""
    ids = sentinel_ids(tok)
    p, s, m = encode_plain_many(tok, [split.prefix, split.suffix, split.middle])
    return [ids[FIM_BEGIN], *p, ids[FIM_HOLE], *s, ids[FIM_END], *m, eos_id]


__all__ = ["PSM", "FimSettings", "FimSplit", "encode_plain", "encode_plain_many", "fim_document_ids",
           "fim_prompt_ids", "fim_split", "sentinel_ids"]
