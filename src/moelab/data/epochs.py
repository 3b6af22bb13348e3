"""Which rows a batch takes: an endless stream that visits every one of ``n`` rows once per epoch, each epoch
in its own seeded order, so batch ``k`` is a pure function of (seed, k) and a resumed run sees the batches an
uninterrupted one would.

    idx = epoch_indices(n, start=step·B, count=B, seed=seed, salt=0x564C)     # [B] row numbers
    epoch e's order: numpy.random.default_rng([seed, e] (+ [salt])).permutation(n)
"""

from __future__ import annotations

import numpy as np


def epoch_indices(n: int, start: int, count: int, seed: int, salt: int | None = None) -> np.ndarray:
    """Positions ``start .. start + count - 1`` of the stream (module docstring) as row numbers ``[count]``."""
    orders: dict[int, np.ndarray] = {}
    idx = []
    for g in range(start, start + count):
        epoch = g // n
        if epoch not in orders:
            key = [seed, epoch] + ([salt] if salt is not None else [])
            orders[epoch] = np.random.default_rng(key).permutation(n)
        idx.append(orders[epoch][g % n])
    return np.asarray(idx)


__all__ = ["epoch_indices"]
