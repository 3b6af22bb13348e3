"""Tokenizers: Hugging Face ``tokenizers`` byte-level BPE, saved as ``tokenizer.json``.

DeepSeek special-token strings use U+FF5C (｜) bars and U+2581 (▁) — not ASCII (METHODS.md §11).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moelab.errors import CheckpointError

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


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` so transformers' AutoTokenizer opens it."""
    d = Path(directory)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
           "pad_token": PAD, "add_bos_token": False, "model_max_length": 1 << 30}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory)
    path = path if path.suffix == ".json" else path / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"no tokenizer.json in {path.parent}; pass token ids with --prompt-ids, "
                              "or save the checkpoint with a tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read tokenizer {path}: {e}") from None
