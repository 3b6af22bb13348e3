"""Incremental detokenisation with stop strings, for streaming.

    stream = TextStream(decode, stops=["\\n\\n"])
    for token in tokens:
        delta, stopped = stream.push(token)      # text safe to send now; True once a stop string appeared
    rest = stream.flush()                        # what was held back, at the end

Text is held back while it ends in an incomplete UTF-8 sequence (the decoder shows U+FFFD there: a byte-level
token can be half a character) or in a prefix of a stop string (it may still become the stop string, which is
never sent). Each push decodes the whole output once: quadratic in the output length, negligible next to a
model step for the lengths a server allows.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Text of one choice's tokens, released as it becomes final. ``decode(ids) -> str``."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None):
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.sent = 0                 # characters of the decoded text already released
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; return (newly final text, whether a stop string ended the output)."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        hit = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hit:
            end = min(hit)
            delta, self.sent = self.text[self.sent:end], end
            self.text = self.text[:end]
            return delta, True
        safe = len(self.text.rstrip("\ufffd"))
        safe -= self._stop_prefix(self.text[:safe])
        if safe <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent:safe], safe
        return delta, False

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string (and may grow into it)."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Everything not yet released (at the end of the output)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


__all__ = ["TextStream"]
