"""One split of a token directory, memory-mapped read-only, cut into training or evaluation windows.

Batches are stateless: ``TokenData.batch(B, T, step, micro, seed)`` draws its windows from a numpy
Generator seeded by ``(seed, step, micro)``, so the batch of any step can be recomputed after a resume.
Shapes: B = batch size, T = sequence length; ``x``, ``y`` are int64 [B, T] with ``y[:, t] = x[:, t+1]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moelab.data.tokens.meta import read_meta
from moelab.errors import DataError


class TokenData:
    """One split of a token directory, memory-mapped read-only.

    Args:
        path: a directory written by :func:`prepare`.
        split: ``train`` or ``val``.
    Attributes:
        tokens: uint16/uint32 [N] (a read-only numpy memmap); n_tokens: N;
        doc_offsets: int64 [D + 1]; meta: the meta.json dict; bytes_per_token: bytes / tokens of the split.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path, self.split = Path(path), split
        self.meta = meta = read_meta(self.path)
        if split not in meta.get("splits", {}):
            raise DataError(f"unknown split {split!r}; {self.path} has {', '.join(meta.get('splits', {}))}")
        info = meta["splits"][split]
        dtype = np.dtype(meta["dtype"])
        bin_path, idx_path = self.path / f"{split}.bin", self.path / f"{split}.idx.npy"
        try:
            size = bin_path.stat().st_size
            self.doc_offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot read the {split} split ({e}); prepare it again") from None
        n = info["tokens"]
        if size != n * dtype.itemsize or len(self.doc_offsets) != info["documents"] + 1 \
                or (n and int(self.doc_offsets[-1]) != n):
            raise DataError(f"{self.path}: {split}.bin / {split}.idx.npy do not match meta.json "
                            "(truncated or overwritten?); prepare it again")
        # np.memmap refuses an empty file; an empty split is a valid (if useless) state.
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)
        self.n_tokens = n
        self.bytes_per_token = info.get("bytes_per_token")

    def __repr__(self) -> str:
        return f"TokenData({str(self.path)!r}, {self.split!r}: {self.n_tokens:,} tokens, " \
               f"{len(self.doc_offsets) - 1:,} documents)"

    def __len__(self) -> int:
        return self.n_tokens

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``, ending with EOS."""
        return np.asarray(self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]])

    def check_fits(self, seq_len: int, batch_size: int) -> None:
        """A :class:`DataError` unless windows of ``seq_len`` + 1 tokens fit this split."""
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        if self.n_tokens < seq_len + 1:
            raise DataError(f"the {self.split} split of {self.path} has {self.n_tokens:,} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}; use a shorter sequence or more data"
                            + (" (or a larger --val-fraction)" if self.split == "val" else ""))

    def batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """B windows at random offsets, a pure function of ``(seed, step, micro)``.

        Windows may cross document boundaries (documents are separated by EOS). Under data parallelism,
        give each rank its own ``micro`` (e.g. ``rank * grad_accum + micro``).
        Returns x, y: int64 [B, T], y[:, t] == x[:, t + 1] (the next token).
        """
        self.check_fits(seq_len, batch_size)
        if min(step, micro, seed) < 0:
            raise DataError(f"step, micro and seed must be >= 0 (got {step}, {micro}, {seed})")
        rng = np.random.default_rng([seed, step, micro])
        starts_B = rng.integers(0, self.n_tokens - seq_len, size=batch_size)
        return self.windows(starts_B, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows in order: window k is x = tokens[kT : kT+T], y = tokens[kT+1 : kT+T+1].

        The targets of all windows tile tokens[1 : W*T + 1] exactly once (W = (N - 1) // T windows; fewer
        than T tokens at the end are left out). The last batch may have fewer than B rows.
        """
        self.check_fits(seq_len, batch_size)
        n_windows = self.n_eval_windows(seq_len)
        n_batches = -(-n_windows // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            k = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows))
            yield self.windows(k * seq_len, seq_len)

    def n_eval_windows(self, seq_len: int) -> int:
        return max(self.n_tokens - 1, 0) // seq_len

    def windows(self, starts_B: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 ``[B, T]`` of the windows starting at ``starts_B`` ``[B]``."""
        idx_BT1 = starts_B[:, None] + np.arange(seq_len + 1)  # [B, T+1]
        w_BT1 = torch.from_numpy(self.tokens[idx_BT1].astype(np.int64))
        return w_BT1[:, :-1].contiguous(), w_BT1[:, 1:].contiguous()
