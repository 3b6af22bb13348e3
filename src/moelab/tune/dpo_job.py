"""``moelab finetune dpo``: preference data for the one training loop (the DPO loss is the data's own,
:class:`~moelab.tune.dpo_data.PreferenceData`; what trains — every weight, LoRA or the selected experts —
is set up as for those methods by :func:`moelab.tune.run.build_job`).

The validation pairs come from ``data.val_path`` or a seeded ``data.val_fraction`` of the file; both
splits get the reference log-probabilities of the base model before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

from moelab.data.prefs import PrefStats, read_preferences
from moelab.data.split import split_off
from moelab.tune.dpo_data import PreferenceData


@dataclass
class PrefLoadStats:
    """What :func:`load_preference_data` met (the fields the fine-tuning summary reads)."""

    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    no_target: int = 0


def load_preference_data(cfg, tokenizer: Tokenizer, vocab_size: int) -> tuple[PreferenceData, PreferenceData,
                                                                              PrefLoadStats]:
    """(train, validation) pairs of a fine-tuning config with method dpo."""
    dc, tc, d = cfg.data, cfg.train, cfg.dpo
    stats = PrefStats()
    pairs = read_preferences(dc.path, tokenizer, dc.seq_len + 1, dc.template, dc.skip_malformed, stats)
    if dc.val_path:
        val = read_preferences(dc.val_path, tokenizer, dc.seq_len + 1, dc.template, dc.skip_malformed, stats)
        train = pairs
    else:
        train, val = split_off(pairs, dc.val_fraction, tc.seed, 0x445050, dc.path, "pair")     # "DPO"
    pad = tokenizer.token_to_id("<｜▁pad▁｜>")
    pad = pad if pad is not None else tokenizer.token_to_id("<｜end▁of▁sentence｜>") or 0
    meta = {"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    kw = dict(beta=d.beta, loss_type=d.loss, label_smoothing=d.label_smoothing)
    out = (PreferenceData(train, dc.seq_len, pad, micro_per_step=tc.grad_accum, meta={**meta, "examples": len(train)},
                          **kw),
           PreferenceData(val, dc.seq_len, pad, meta={**meta, "examples": len(val)}, **kw))
    return out[0], out[1], PrefLoadStats(skipped=stats.skipped)


__all__ = ["PrefLoadStats", "load_preference_data"]
