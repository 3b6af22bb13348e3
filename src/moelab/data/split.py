"""A seeded validation split of records read from one file: ``fraction`` of them (at least one, never all)
held out, both parts kept in file order, the same for the same (seed, salt) so that a resumed run trains on
the rows it trained on before.

    train, val = split_off(records, fraction=0.05, seed=0, salt=0x4752, path="prompts.jsonl", noun="prompt")
    held out: numpy.random.default_rng([seed, salt]).permutation(n)[:max(1, round(fraction · n))]
"""

from __future__ import annotations

import os
from typing import TypeVar

import numpy as np

from moelab.errors import DataError

T = TypeVar("T")


def split_off(records: list[T], fraction: float, seed: int, salt: int, path: str | os.PathLike,
              noun: str) -> tuple[list[T], list[T]]:
    """``(train, val)`` (module docstring); fewer than two records is a :class:`DataError` naming ``path``."""
    n = len(records)
    if n < 2:
        raise DataError(f"{path}: {n} {noun}{'s' if n != 1 else ''} cannot be split into training and validation; "
                        f"add {noun}s or set data.val_path")
    order = np.random.default_rng([seed, salt]).permutation(n)
    n_val = min(max(1, round(fraction * n)), n - 1)
    return [records[i] for i in sorted(order[n_val:])], [records[i] for i in sorted(order[:n_val])]


__all__ = ["split_off"]
