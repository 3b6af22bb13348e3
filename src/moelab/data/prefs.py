"""Preference data for DPO: one pair per JSON line, rendered with the chat format of :mod:`moelab.data.chat`.

    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "chosen": "...", "rejected": "..."}

Each pair becomes two examples sharing the prompt — ``(ids, labels)`` of the conversation ending with the
chosen answer and with the rejected one; labels are −100 except on the answer and its EOS, so a
sequence log-probability sums exactly the answer's tokens. A line missing a field, with an empty or
identical chosen/rejected answer, or whose prompt leaves no room for an answer within ``max_len``, is a
:class:`DataError` ``file:line: reason`` — or, with ``skip_malformed``, skipped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from moelab.data.chat import ChatFormat, Example, to_messages
from moelab.data.jsonl import read_records
from moelab.errors import DataError


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    where: str


@dataclass
class PrefStats:
    lines: int = 0
    pairs: int = 0
    skipped: list[str] = field(default_factory=list)


def _prompt_messages(row: dict) -> list[dict]:
    if "messages" in row:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "user"):
            raise DataError("'messages' must be a list of turns ending with the user's")
        return to_messages({"messages": [*msgs, {"role": "assistant", "content": "x"}]})[:-1]
    if not isinstance(row.get("prompt"), str):
        raise DataError("'prompt' (a string) or 'messages' (a list of turns) is missing")
    return [{"role": "user", "content": row["prompt"]}]


def read_preferences(path: str | os.PathLike, tokenizer: Tokenizer, max_len: int, template: str = "deepseek",
                     skip_malformed: bool = False, stats: PrefStats | None = None) -> list[PreferencePair]:
    """Every pair of a preference JSON Lines file, rendered and checked (module docstring)."""
    fmt, stats = ChatFormat(tokenizer, template), stats if stats is not None else PrefStats()
    before = len(stats.skipped)
    pairs = read_records(path, lambda row, where: _pair(row, fmt, max_len, where),
                         what="preference file (JSON Lines with prompt/chosen/rejected)",
                         skip_malformed=skip_malformed, skipped=stats.skipped, hint="skip_malformed")
    stats.lines += len(pairs) + len(stats.skipped) - before
    stats.pairs = len(pairs)
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs ({len(stats.skipped)} skipped)")
    return pairs


def _pair(row: dict, fmt: ChatFormat, max_len: int, where: str) -> PreferencePair:
    prompt = _prompt_messages(row)
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{key!r} missing, not a string, or empty")
    if row["chosen"] == row["rejected"]:
        raise DataError("chosen and rejected are identical; a pair must prefer one answer over another")
    chosen = fmt.render([*prompt, {"role": "assistant", "content": row["chosen"]}])
    rejected = fmt.render([*prompt, {"role": "assistant", "content": row["rejected"]}])
    prompt_len = len(fmt.prompt_ids(prompt))
    if prompt_len >= max_len:
        raise DataError(f"the prompt is {prompt_len} tokens, which leaves no room for an answer within "
                        f"{max_len}; shorten it or raise the sequence length")
    for ex in (chosen, rejected):               # answers cut to the context (their first tokens still count)
        ex.ids, ex.labels = ex.ids[:max_len], ex.labels[:max_len]
    return PreferencePair(chosen, rejected, where)


__all__ = ["PrefStats", "PreferencePair", "read_preferences"]
