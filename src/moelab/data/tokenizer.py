"""Tokenizers: Hugging Face ``tokenizers`` byte-level BPE, saved as ``tokenizer.json``.

DeepSeek special-token strings use U+FF5C (｜) bars and U+2581 (▁) — not ASCII (docs/methods.md §11).

Id layout of every tokenizer moelab builds: the 8 :data:`SPECIAL_TOKENS` at ids 0..7 (BOS 0, EOS 1,
PAD 2), then the 256 byte symbols at 8..263 (sorted, as in :func:`byte_level_tokenizer`), then the
merges that :func:`train_tokenizer` learns. Any text encodes, and decodes back exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.common.chat_template import CHAT_TEMPLATE, wants_chat_template
from moelab.common.run_dir_hint import check_not_run_dir
from moelab.errors import CheckpointError, DataError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIM_HOLE, FIM_BEGIN, FIM_END = "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
#: Reserved in every tokenizer moelab builds; BOS is id 0 and EOS id 1, as in DeepSeek-V3.
SPECIAL_TOKENS = [BOS, EOS, PAD, FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT]


def byte_level_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    """An untrained byte-level BPE: the special tokens, then the 256 byte symbols, no merges.

    Any text round-trips through it; training (later) only adds merges on top.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    special_tokens: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` with the id layout of :func:`byte_level_tokenizer`.

    The special tokens come first (BOS 0, EOS 1, PAD 2, ...), then all 256 byte symbols whether or not
    the texts use them (so any text encodes), then merges until ``vocab_size`` tokens or until no pair
    occurs ``min_frequency`` times (the vocabulary may then be smaller: read ``get_vocab_size()``).
    Digits are split one per token before BPE, as DeepSeek's tokenizers do, so numbers never merge.
    """
    check_vocab_size(vocab_size, len(special_tokens))
    if min_frequency < 1:
        raise DataError(f"min_frequency must be at least 1 (got {min_frequency})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_vocab_size(vocab_size: int, n_special: int = len(SPECIAL_TOKENS)) -> None:
    """Raise a :class:`DataError` unless ``vocab_size`` holds the special tokens and the 256 bytes."""
    minimum = n_special + 256
    if vocab_size < minimum:
        raise DataError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {minimum} "
                        f"({n_special} special tokens + 256 bytes)")


def _pre_tokenizer():
    # Digits(individual) isolates every digit, then ByteLevel maps bytes to symbols and splits words
    # the GPT-2 way. Pre-tokenizers only split, so decoding concatenates back to the exact text.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def check_layout(tok: Tokenizer, where: str = "the tokenizer") -> None:
    """Raise a :class:`DataError` unless BOS, EOS and PAD sit at ids 0, 1, 2 (the moelab layout)."""
    for name, want in ((BOS, 0), (EOS, 1), (PAD, 2)):
        got = tok.token_to_id(name)
        if got != want:
            raise DataError(f"{where} has {name!r} at id {got}, not {want}: moelab expects BOS 0, EOS 1, "
                            "PAD 2; train one instead (omit --tokenizer) or use a moelab tokenizer.json")


def literal_text_tokenizer(tok: Tokenizer) -> Tokenizer:
    """``tok``, or a copy of it in which every added token is *special*, so that with
    ``encode_special_tokens = True`` text that spells one (``"<｜fim▁hole｜>"`` in a source file) is encoded
    as its bytes. The real DeepSeek-V3 tokenizer marks its FIM and chat tokens as non-special added tokens,
    which that flag would otherwise leave matched. Ids are unchanged; the copy is for encoding only."""
    if all(t.special for t in tok.get_added_tokens_decoder().values()):
        return tok
    data = json.loads(tok.to_str())
    for t in data.get("added_tokens", []):
        t["special"] = True
    return Tokenizer.from_str(json.dumps(data))


def tokenizer_config(tok: Tokenizer) -> dict:
    """``tokenizer_config.json`` of a moelab tokenizer (with the chat template when it has the chat tokens)."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
           "pad_token": PAD, "add_bos_token": False, "model_max_length": 1 << 30}
    if wants_chat_template(lambda t: tok.token_to_id(t) is not None):
        cfg["chat_template"] = CHAT_TEMPLATE
    return cfg


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` so transformers' AutoTokenizer opens it."""
    d = Path(directory)
    tok.save(str(d / "tokenizer.json"))
    cfg = tokenizer_config(tok)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory)
    path = path if path.suffix == ".json" else path / "tokenizer.json"
    if not path.is_file():
        check_not_run_dir(path.parent)
        raise CheckpointError(f"no tokenizer.json in {path.parent}; copy the tokenizer.json the model was trained "
                              "with next to its weights (`moelab generate` also takes token ids: --prompt-ids)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read tokenizer {path}: {e}") from None
