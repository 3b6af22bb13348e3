"""The decoding caches.

For MLA each layer stores only what absorbed attention needs, in one buffer: the normalised latent
``c_KV`` and the rotated, head-shared RoPE key ``k_pe`` side by side, ``[B, S, kv_lora_rank +
qk_rope_head_dim]`` — never expanded K/V (docs/methods.md §4).
For MHA/GQA it stores rotated keys and values ``[B, S, H_kv, D]``.

Two kinds, one interface for the attention modules (``cache.update(layer, *new)`` returns what to attend
against):

* :class:`DecodingCache` grows by doubling (appending one token is amortised O(1) copies); each step
  attends against exactly the ``S`` cached tokens, so shapes change every step.
* :class:`StaticCache` is allocated once for ``capacity`` tokens (prompt + new tokens). Forwards that know
  their length on the host (the prefill) write and read prefixes as above; a **decode step** writes its one
  token in place at a slot held in a device tensor and attends against the whole buffer (the caller masks the
  slots not yet written), so every step has the same shapes and reads nothing back to the host: it can be
  captured as a CUDA graph or compiled once (:mod:`moelab.infer.static`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelab.errors import MoelabError


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


class StaticSlot:
    """One layer's buffers seen by a decode step: ``update(layer, x)`` writes ``x`` ``[B, 1, ...]`` at slot
    ``position`` (a device tensor ``[1]``, so no host value is baked into a captured graph) and returns the
    whole buffers ``[B, capacity, ...]``. The step's mask must hide the slots after ``position``."""

    def __init__(self, bufs: tuple[torch.Tensor, ...], position: torch.Tensor):
        self.bufs = bufs
        self.position = position

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        del layer  # the slot is already one layer's
        for b, x in zip(self.bufs, new, strict=True):
            b.index_copy_(1, self.position, x.to(b.dtype))
        return self.bufs


class StaticCache:
    """Per-layer buffers ``[B, capacity, ...]`` allocated once (zeros: unwritten slots stay finite, so a
    masked slot contributes exactly 0 to the value product).

    ``update(layer, *new)`` appends like :class:`DecodingCache` (the prefill; lengths known on the host) and
    refuses to overflow. A decode step instead writes through :meth:`step_slots` at :attr:`position`; the step
    advances :attr:`position` on the device and its runner calls :meth:`stepped` for the host's count.
    """

    def __init__(self, layer_shapes: Sequence[Sequence[tuple[int, ...]]], batch: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        if capacity < 1:
            raise MoelabError(f"a static cache needs a capacity of at least one token (got {capacity})")
        self.batch, self.capacity = batch, capacity
        self._bufs = [tuple(torch.zeros(batch, capacity, *shape, dtype=dtype, device=device) for shape in shapes)
                      for shapes in layer_shapes]
        self._lens = [0] * len(self._bufs)
        #: slot the next decode step writes (device ``[1]`` int64); set from :attr:`seq_len` by :meth:`step_slots`
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        #: ``arange(capacity)`` on the device, for the steps' length masks
        self.slots = torch.arange(capacity, device=device)
        self._step_slots = [StaticSlot(bufs, self.position) for bufs in self._bufs]

    @property
    def seq_len(self) -> int:
        """Tokens cached (layer 0; read it before a forward pass to get the position offset)."""
        return self._lens[0]

    def check_room(self, tokens: int) -> None:
        """Refuse (:class:`~moelab.errors.MoelabError`) to cache ``tokens`` more than there is room for."""
        if self.seq_len + tokens > self.capacity:
            raise MoelabError(f"the static cache holds {self.capacity} tokens per sequence; {self.seq_len} are "
                              f"cached and {tokens} more do not fit (allocate it for prompt + max_new_tokens)")

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, t = self._lens[layer], new[0].shape[1]
        if n + t > self.capacity:
            raise MoelabError(f"the static cache holds {self.capacity} tokens per sequence; {n} are cached and "
                              f"{t} more do not fit (allocate it for prompt + max_new_tokens)")
        bufs = self._bufs[layer]
        for b, x in zip(bufs, new, strict=True):
            b[:, n:n + t] = x
        self._lens[layer] = n + t
        return tuple(b[:, :n + t] for b in bufs)

    def step_slots(self) -> list[StaticSlot]:
        """The per-layer views a decode step writes through; sets :attr:`position` to :attr:`seq_len`."""
        self.position.fill_(self.seq_len)
        return self._step_slots

    def stepped(self) -> None:
        """Count one decode step on the host (the step itself advanced :attr:`position` on the device)."""
        self._lens = [n + 1 for n in self._lens]

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        return tuple(b[:, :self._lens[layer]] for b in self._bufs[layer])

    def elems_per_token(self) -> int:
        """Cached values per token per sequence, summed over layers."""
        return sum(int(b.shape[2:].numel()) for bufs in self._bufs for b in bufs)

    def bytes_per_token(self) -> int:
        return sum(int(b.shape[2:].numel()) * b.element_size() for bufs in self._bufs for b in bufs)

    def nbytes(self) -> int:
        """Bytes allocated for all layers."""
        return sum(b.numel() * b.element_size() for bufs in self._bufs for b in bufs)


#: What the attention modules accept as ``cache``: anything with ``update(layer, *new) -> tensors to attend``.
KVCache = DecodingCache | StaticCache | StaticSlot
