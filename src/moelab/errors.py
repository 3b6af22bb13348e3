"""Error types raised by moelab.

Every error a user can cause (a bad config, a broken checkpoint, an impossible request) is a
:class:`MoelabError` with a message that says what is wrong and what to do. The CLI prints the
message on stderr and exits non-zero; it never shows a stack trace for these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoelabError(Exception):
    """Base class of every error moelab raises on purpose."""


class ConfigError(MoelabError, ValueError):
    """A configuration is malformed: unknown key, wrong type, or fields that contradict each other."""


class CheckpointError(MoelabError):
    """A checkpoint directory or weight file cannot be read or does not match its config."""


class DataError(MoelabError):
    """A corpus, tokenizer or token directory cannot be read, or a data request is impossible."""


class TrainingError(MoelabError):
    """A training run cannot go on (a non-finite loss, data that does not fit the model, ...)."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to ``name`` (for "did you mean ...?" hints), or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix, or an empty string when nothing is close."""
    best = closest(name, candidates)
    return f"; did you mean '{best}'?" if best else ""
