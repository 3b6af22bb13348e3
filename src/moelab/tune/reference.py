"""The frozen reference model of DPO and GRPO: ``dpo.reference`` / ``grpo.reference`` (a checkpoint) or the
base model, loaded in float32 with every parameter frozen.

    ref = load_reference("runs/sft/model", base="runs/sft/model", section="grpo",
                         policy_tokenizer=tok, vocab_size=model.config.vocab_size)

Both losses compare the policy's and the reference's log-probabilities of the *same token ids*, so a
reference given explicitly must carry the policy's tokenizer (identical vocabulary, special tokens included)
and as many vocabulary rows; anything else is a :class:`~moelab.errors.CheckpointError` that says which.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from moelab.data.tokenizer import load_tokenizer
from moelab.errors import CheckpointError
from moelab.interop.checkpoint import load as load_checkpoint_dir


def load_reference(path: str | None, base: str | Path, section: str, policy_tokenizer: Tokenizer, vocab_size: int,
                   **model_settings) -> torch.nn.Module:
    """The frozen reference: ``path`` or, when it is None, ``base``; checked against the policy's tokenizer."""
    where = Path(path or base)
    name = f"{section}.reference"
    if not (where / "config.json").is_file():
        raise CheckpointError(f"{name} {where} is not a checkpoint directory (no config.json)")
    if path:
        try:
            ref_tok = load_tokenizer(where)
        except CheckpointError:
            raise CheckpointError(f"{name} {where} has no tokenizer.json; the loss compares log-probabilities "
                                  "of the same token ids, so the reference must come with the policy's "
                                  "tokenizer") from None
        if ref_tok.get_vocab(with_added_tokens=True) != policy_tokenizer.get_vocab(with_added_tokens=True):
            raise CheckpointError(f"{name} {where} has a different tokenizer from finetune.base {base}; the loss "
                                  "compares log-probabilities of the same token ids, so use a reference trained "
                                  "with the policy's tokenizer")
    ref = load_checkpoint_dir(where, dtype=torch.float32, **model_settings)
    if ref.config.vocab_size != vocab_size:
        raise CheckpointError(f"{name} {where} has {ref.config.vocab_size} vocabulary rows but the policy "
                              f"{vocab_size}; use a reference with the policy's vocabulary")
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


__all__ = ["load_reference"]
