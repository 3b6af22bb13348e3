"""The decoding cache.

For MLA each layer stores only what absorbed attention needs, in one buffer: the normalised latent
``c_KV`` and the rotated, head-shared RoPE key ``k_pe`` side by side, ``[B, S, kv_lora_rank +
qk_rope_head_dim]`` — never expanded K/V (docs/methods.md §4).
For MHA/GQA it stores rotated keys and values ``[B, S, H_kv, D]``.

Storage grows by doubling, so appending one token is amortised O(1) copies.
"""

from __future__ import annotations

import torch


class DecodingCache:
    """Per-layer growable buffers. ``update(layer, *new)`` appends ``[B, t, ...]`` tensors and
    returns views of everything cached for that layer (``[B, S, ...]``)."""

    def __init__(self, num_layers: int):
        self._bufs: list[list[torch.Tensor] | None] = [None] * num_layers
        self._lens = [0] * num_layers

    @property
    def seq_len(self) -> int:
        """Tokens cached (layer 0; read it before a forward pass to get the position offset)."""
        return self._lens[0]

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, t = self._lens[layer], new[0].shape[1]
        bufs = self._bufs[layer]
        if bufs is None or n + t > bufs[0].shape[1]:
            cap = max(2 * (n + t), 16)
            grown = []
            for i, x in enumerate(new):
                b = x.new_empty(x.shape[0], cap, *x.shape[2:])
                if bufs is not None:
                    b[:, :n] = bufs[i][:, :n]
                grown.append(b)
            self._bufs[layer] = bufs = grown
        for b, x in zip(bufs, new, strict=True):
            b[:, n:n + t] = x
        self._lens[layer] = n + t
        return tuple(b[:, :n + t] for b in bufs)

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        bufs = self._bufs[layer]
        return () if bufs is None else tuple(b[:, :self._lens[layer]] for b in bufs)

    def elems_per_token(self) -> int:
        """Cached values per token per sequence, summed over layers."""
        return sum(int(b.shape[2:].numel()) for bufs in self._bufs if bufs for b in bufs)

    def bytes_per_token(self) -> int:
        return sum(int(b.shape[2:].numel()) * b.element_size() for bufs in self._bufs if bufs for b in bufs)
