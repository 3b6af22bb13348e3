"""Near-duplicate detection: MinHash signatures with LSH banding (Broder 1997; the standard dedup of code
corpora, DeepSeek-Coder §2.1.3 / Coder-V2 §2).

Legend: P permutations (signature length), B bands of R rows (B·R = P), J the Jaccard similarity of two
documents' shingle sets (word n-grams, n = ``shingle``).

    sig[p]  = min over shingles s of (a_p · h(s) + b_p) mod (2³¹ − 1)       h: 64-bit blake2b, reduced
    P(sig_1[p] == sig_2[p]) = J                                             (for each p)
    candidates: documents that agree on all R rows of at least one band    P = 1 − (1 − J^R)^B
    near-duplicate: a candidate whose signatures agree in ≥ ``threshold`` of the P places (estimated J)

With the defaults (P = 128, B = 32, R = 4, threshold 0.85) a pair with J = 0.85 becomes a candidate with
probability 1 − (1 − 0.85⁴)³² > 0.9999; the estimate of J then has a standard deviation of
√(J(1 − J)/P) ≈ 0.03. Everything is seeded: the same corpus gives the same decisions.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

_PRIME = (1 << 31) - 1
_WORD = re.compile(r"\w+|[^\w\s]")


def shingles(text: str, n: int = 5) -> set[str]:
    """Word ``n``-grams of ``text`` (words and single punctuation marks; whitespace ignored)."""
    words = _WORD.findall(text)
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicates:
    """Keep the first of every group of near-duplicate documents, in the order they are offered.

        nd = NearDuplicates()
        nd.add("doc text")   # True: kept (no earlier kept document is a near-duplicate); False: a duplicate
    """

    def __init__(self, threshold: float = 0.85, permutations: int = 128, bands: int = 32, shingle: int = 5,
                 seed: int = 0):
        if permutations % bands:
            raise ValueError(f"bands ({bands}) must divide permutations ({permutations})")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1] (got {threshold})")
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a = rng.integers(1, _PRIME, size=permutations, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=permutations, dtype=np.uint64)
        self.threshold, self.bands, self.rows, self.shingle = threshold, bands, permutations // bands, shingle
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self.kept: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        """``[P]`` uint64 MinHash signature of ``text``'s shingles (all ``_PRIME`` for an empty text)."""
        sh = shingles(text, self.shingle)
        if not sh:
            return np.full(len(self.a), _PRIME, dtype=np.uint64)
        h = np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % _PRIME
                         for s in sh), dtype=np.uint64, count=len(sh))
        return ((self.a[:, None] * h[None, :] + self.b[:, None]) % _PRIME).min(axis=1)   # a, h < 2³¹: no overflow

    def add(self, text: str) -> bool:
        sig = self.signature(text)
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen = set()
        for band, key in enumerate(keys):
            for j in self.buckets[band].get(key, ()):
                if j not in seen:
                    seen.add(j)
                    if float((self.kept[j] == sig).mean()) >= self.threshold:
                        return False
        idx = len(self.kept)
        self.kept.append(sig)
        for band, key in enumerate(keys):
            self.buckets[band][key].append(idx)
        return True


__all__ = ["NearDuplicates", "jaccard", "shingles"]
