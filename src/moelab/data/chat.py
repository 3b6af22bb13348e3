"""Chat data in, token ids and loss labels out: reading SFT JSON Lines and rendering them with a template.

Input, one JSON object per line (blank lines are ignored)::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}

Templates (``template``):

* ``deepseek`` (default) — the DeepSeek-V3 chat format, built from the special tokens::

      <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...

* ``plain`` — the ESFT format (docs/methods.md §5): ``{system}\\n\\nUser: {x}\\n\\nAssistant: {y}<eos>``, BOS first.

Loss only on what the model should learn to say: each assistant turn's content and the EOS after it
(labels −100 everywhere else). A prompt/completion pair is one user turn and one assistant turn.
Each segment is tokenised on its own and the ids concatenated, so a mask boundary never falls inside
a token. An :class:`Example` holds ``ids`` [n] and ``labels`` [n] of one conversation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer

from moelab.data.tokenizer import ASSISTANT, BOS, EOS, PAD, USER
from moelab.errors import DataError

IGNORE = -100
Template = Literal["deepseek", "plain"]
_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenised conversation: ``ids`` [n] and ``labels`` [n] (−100 where no loss)."""

    ids: list[int]
    labels: list[int]
    answer_bytes: int            # UTF-8 bytes of the trained text (for bits per byte)


@dataclass
class SFTStats:
    """What reading, rendering and packing an SFT file met: lines, examples, skips and truncations."""

    lines: int = 0
    examples: int = 0
    skipped: list[str] = field(default_factory=list)   # "file:line: reason"
    truncated: int = 0
    no_target: int = 0                                 # examples whose trained part was cut away


# -- reading ------------------------------------------------------------------------------------------

#: How the user of a caller turns skipping malformed lines on: read_jsonl's own argument (the default),
#: a fine-tuning run's setting (load_sft).
LIBRARY_SKIP_HINT = "pass skip_malformed=True"
FINETUNE_SKIP_HINT = "pass skip_malformed (--set data.skip_malformed=true)"


def read_jsonl(path: str | os.PathLike, skip_malformed: bool = False, stats: SFTStats | None = None,
               skip_hint: str | None = LIBRARY_SKIP_HINT) -> Iterator[tuple[str, list[dict]]]:
    """Yield ``(where, messages)`` for each line of a chat or prompt/completion JSONL file.

    A malformed line raises :class:`DataError` naming the file and line, unless ``skip_malformed``,
    which skips it and records it in ``stats.skipped``. ``skip_hint`` tells the user how the caller
    turns skipping on; a caller that cannot skip passes None, and the error only says to fix the line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist; give a JSON Lines file with 'messages' or 'prompt'/'completion'")
    stats = stats if stats is not None else SFTStats()
    try:
        fh = open(p, encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise DataError(f"cannot read {p}: {e}") from None
    with fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError:
                raise DataError(f"{p}: line {lineno + 1} is not UTF-8 text; re-encode the file as UTF-8") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            stats.lines += 1
            where = f"{p}:{lineno}"
            try:
                messages = to_messages(json.loads(line))
            except (json.JSONDecodeError, DataError) as e:
                reason = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                if not skip_malformed:
                    how = (f"fix the line, or {skip_hint} to skip and count such lines" if skip_hint
                           else "fix or remove the line")
                    raise DataError(f"{where}: {reason}; {how}") from None
                stats.skipped.append(f"{where}: {reason}")
                continue
            yield where, messages


def to_messages(obj) -> list[dict]:
    """Normalise one record to a list of ``{"role", "content"}`` messages (validated)."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"message {i} must be an object with string 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise DataError(f"message {i} has role {m['role']!r}; use one of {', '.join(_ROLES)}")
            if m["role"] == "system" and i != 0:
                raise DataError(f"message {i}: a system message may only come first")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError("the conversation has no assistant message, so nothing to learn from")
        return out
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise DataError("'prompt' and 'completion' must both be strings")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise DataError(f"no 'messages' and no 'prompt'/'completion' keys (found: {', '.join(sorted(obj)) or 'none'})")


# -- rendering ----------------------------------------------------------------------------------------

class ChatFormat:
    """Renders messages into token ids and labels with a tokenizer and a template."""

    def __init__(self, tokenizer: Tokenizer, template: Template = "deepseek"):
        if template not in ("deepseek", "plain"):
            raise DataError(f"unknown chat template {template!r}; use 'deepseek' or 'plain'")
        self.tok, self.template = tokenizer, template
        self.bos, self.eos = self._special(BOS), self._special(EOS)
        self.pad = tokenizer.token_to_id(PAD)
        self.pad = self.eos if self.pad is None else self.pad
        if template == "deepseek":
            self.user, self.assistant = self._special(USER), self._special(ASSISTANT)

    def _special(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise DataError(f"the tokenizer has no {token!r} token; use template 'plain' or a tokenizer that "
                            "reserves the DeepSeek special tokens (every moelab tokenizer does)")
        return i

    def _text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def render(self, messages: list[dict]) -> Example:
        ids, labels, answer_bytes = [self.bos], [IGNORE], 0

        def add(part: list[int], train: bool) -> None:
            ids.extend(part)
            labels.extend(part if train else [IGNORE] * len(part))

        msgs = list(messages)
        if msgs and msgs[0]["role"] == "system":
            sys_text = msgs.pop(0)["content"]
            add(self._text(sys_text + ("\n\n" if self.template == "plain" and sys_text else "")), False)
        for m in msgs:
            if m["role"] == "user":
                if self.template == "deepseek":
                    add([self.user] + self._text(m["content"]) + [self.assistant], False)
                else:
                    add(self._text(f"User: {m['content']}\n\nAssistant: "), False)
            else:  # assistant
                add(self._text(m["content"]) + [self.eos], True)
                answer_bytes += len(m["content"].encode())
        return Example(ids, labels, answer_bytes)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids that ask the model for the next assistant turn (generation prompt)."""
        ex = self.render(list(messages) + [{"role": "assistant", "content": ""}])
        return ex.ids[:-1]   # without the EOS of the empty answer
