"""A weighted mixture of token directories (DeepSeek-Coder-V2's continued pre-training: 60% code, 10% math,
30% natural language; docs/methods.md §11), batched like one :class:`~moelab.data.tokens.reader.TokenData`.

    data = MixtureData({"code": ("runs/data/code", 0.6), "math": ("runs/data/math", 0.1),
                        "text": ("runs/data/shk", 0.3)}, split="train")
    x, y = data.batch(16, 256, step, micro, seed)        # int64 [B, T]

Rows per source in a batch of B (systematic sampling, a pure function of ``(seed, step, micro)``):

    c_i = ⌊B·W_i + u⌋ − ⌊B·W_{i−1} + u⌋      W_i = w_1 + … + w_i (weights normalised), u ~ U[0, 1)

so every batch holds ⌊B·w_i⌋ or ⌈B·w_i⌉ rows of source i and the expected share is exactly w_i; the rows
are then shuffled (under data parallelism each rank's run of rows is a mix too), each a window at a random
offset of its source. A resumed run recomputes the same batches. Every source must use the same tokenizer
(prepare the others with ``--tokenizer`` of the first).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from moelab.data.tokens.reader import TokenData
from moelab.errors import DataError


class MixtureData:
    """Sources ``{name: (token directory, weight)}`` of one split; ``batch`` as :meth:`TokenData.batch`."""

    def __init__(self, sources: dict[str, tuple[str | os.PathLike, float]], split: str = "train"):
        if not sources:
            raise DataError("a mixture needs at least one source")
        weights = np.array([float(w) for _, w in sources.values()])
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            got = dict(zip(sources, weights.tolist(), strict=True))
            raise DataError(f"mixture weights must be >= 0 and not all 0 (got {got})")
        self.names = list(sources)
        self.weights = weights / weights.sum()
        self.parts = [TokenData(path, split) for path, _ in sources.values()]
        tok = {name: _tokenizer_digest(p.path) for name, p in zip(self.names, self.parts, strict=True)}
        if len(set(tok.values())) > 1:
            raise DataError(f"the mixture's sources were prepared with different tokenizers ({', '.join(tok)}); "
                            f"prepare them with --tokenizer {self.parts[0].path} so that ids mean the same")
        first = self.parts[0]
        self.path, self.split, self.meta = first.path, split, first.meta
        self.bytes_per_token = first.bytes_per_token

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} {w:.0%}" for n, w in zip(self.names, self.weights, strict=True))
        return f"MixtureData({parts}; {self.split})"

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def counts(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Rows per source ``[S]`` for one batch (module docstring)."""
        edges = np.floor(np.cumsum(self.weights) * batch_size + rng.random()).astype(np.int64)
        edges[-1] = batch_size                 # (the weights' sum may round to just under 1)
        return np.diff(np.concatenate([[0], edges]))

    def batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """B windows drawn from the sources by weight, a pure function of ``(seed, step, micro)``; also
        sets ``last_sources`` (the source index of each row)."""
        if min(step, micro, seed) < 0:
            raise DataError(f"step, micro and seed must be >= 0 (got {step}, {micro}, {seed})")
        rng = np.random.default_rng([seed, step, micro, 0x4D4958])          # "MIX"
        counts = self.counts(batch_size, rng)
        xs, ys, which = [], [], []
        for i, (part, c) in enumerate(zip(self.parts, counts, strict=True)):
            if c == 0:
                continue
            part.check_fits(seq_len, int(c))
            starts = rng.integers(0, part.n_tokens - seq_len, size=int(c))
            x, y = part.windows(starts, seq_len)
            xs.append(x)
            ys.append(y)
            which += [i] * int(c)
        order = torch.from_numpy(rng.permutation(batch_size))
        self.last_sources = np.array(which)[order.numpy()]
        return torch.cat(xs)[order], torch.cat(ys)[order]

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None):
        """The first source's evaluation windows (the others are evaluated as extra sets by the loop)."""
        return self.parts[0].eval_batches(batch_size, seq_len, max_batches)

    def n_eval_windows(self, seq_len: int) -> int:
        return self.parts[0].n_eval_windows(seq_len)


def _tokenizer_digest(path: Path) -> str:
    f = Path(path) / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else ""


__all__ = ["MixtureData"]
