"""A paged decoding cache: one pool of fixed-size blocks shared by every running sequence.

Legend: B sequences in a forward, T new tokens per sequence, S the longest sequence after this forward
(cached + new), K ``block_size``, NB blocks in the pool, E the values cached per token per layer
(MLA: ``kv_lora_rank + qk_rope_head_dim`` — the normalised latent and the shared RoPE key, nothing expanded;
MHA/GQA: K and V ``[G, D]`` each).

    pool = BlockPool.for_model(model, budget_tokens=8192, block_size=16)
    seq = PagedSequence()                          # a block table + a length
    pool.reserve(pool.blocks_for(prompt + max_new))  # admission: never allocate past the budget
    view = PagedBatch(pool, [seq], new_tokens=T)    # what the attention reads: update(layer, *new)
    logits = model(ids_1T, cache=view).logits; view.commit()

**Layout.** Per layer and cached tensor the pool is ``[NB + 1, K, *E]``; block 0 is never handed out and stays
zero: padding slots point at it, so a masked slot holds finite values (0 · NaN cannot leak into the value
product). A sequence's tokens live in the blocks of its table, token ``i`` at slot ``i % K`` of block
``table[i // K]``. Blocks are taken when tokens are written and returned when the sequence ends; admission
reserves a sequence's worst case (prompt + max new tokens) up front, so a running sequence never waits for a
block and the scheduler never preempts.

**How the attention reads it** (:class:`PagedBatch`, the ``cache`` argument of the model's forward): for one
forward over B sequences with T new tokens each, ``update(layer, *new)`` scatters the new ``[B, T, *E]`` into
the sequences' slots and *gathers* each sequence's slots into a left-padded ``[B, S, *E]`` batch (one
``index_select`` over the flattened pool per layer and tensor); the caller passes :meth:`PagedBatch.padding`
``[B, S]`` as the attention mask and :meth:`PagedBatch.positions` ``[B, T]`` as position ids. Left padding puts
every sequence's newest token in the last column, as the model's masks expect (``attention_mask_for``).

**Cost.** The gather copies ``B · S · E`` values per layer per forward: a decode step reads the whole batch
once more than a paged-attention kernel would (which reads the blocks in place), and the padding costs
``(S - len_b)`` wasted slots per row. On a CPU this is a few percent of a step for short contexts; it is the
seam where a paged-attention kernel would go.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moelab.errors import MoelabError
from moelab.model.transformer import DeepSeekForCausalLM


def cache_shapes(model: DeepSeekForCausalLM) -> tuple[tuple[int, ...], ...]:
    """Per-token shapes of one layer's cached tensors: ``((C+R,),)`` for MLA, ``((G, D), (G, D))`` for MHA/GQA."""
    cfg = model.config
    if cfg.use_mla:
        return ((cfg.kv_lora_rank + cfg.qk_rope_head_dim,),)
    return ((cfg.kv_heads, cfg.attn_head_dim),) * 2


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens for ``num_layers`` layers, with a reservation count.

    :meth:`reserve` / :meth:`unreserve` book blocks against the budget (admission); :meth:`take` hands out a
    booked block; :meth:`give_back` returns blocks and their booking. Not thread-safe: one engine thread owns it.
    """

    def __init__(self, num_layers: int, shapes: Sequence[tuple[int, ...]], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        if block_size < 1 or num_blocks < 1:
            raise MoelabError(f"the paged cache needs at least one block of at least one token "
                              f"(got {num_blocks} blocks of {block_size})")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.layers = [tuple(torch.zeros(num_blocks + 1, block_size, *s, dtype=dtype, device=device) for s in shapes)
                       for _ in range(num_layers)]
        self.device = torch.device(device)
        self._free = list(range(num_blocks, 0, -1))      # block 0 is the zero block: never handed out
        self.reserved = 0

    @classmethod
    def for_model(cls, model: DeepSeekForCausalLM, budget_tokens: int, block_size: int = 16) -> BlockPool:
        """A pool holding ``budget_tokens`` tokens (rounded down to whole blocks) in the model's dtype and device."""
        if budget_tokens < block_size:
            raise MoelabError(f"the cache budget ({budget_tokens} tokens) is smaller than one block "
                              f"({block_size} tokens); raise --cache-tokens")
        return cls(model.config.num_hidden_layers, cache_shapes(model), budget_tokens // block_size, block_size,
                   model.dtype, model.device)

    # -- accounting -------------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(max(tokens, 0) / self.block_size)

    @property
    def used(self) -> int:
        """Blocks holding tokens now."""
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.layers for b in bufs)

    def reserve(self, blocks: int) -> bool:
        """Book ``blocks`` if they are still free of bookings; False (nothing booked) otherwise."""
        if self.reserved + blocks > self.num_blocks:
            return False
        self.reserved += blocks
        return True

    def unreserve(self, blocks: int) -> None:
        self.reserved -= blocks
        if self.reserved < 0:
            raise MoelabError("paged cache accounting went negative (a sequence was released twice)")

    def take(self) -> int:
        if not self._free:
            raise MoelabError("the paged cache ran out of blocks although they were reserved (an accounting bug)")
        return self._free.pop()

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy the contents of blocks ``src`` into ``dst`` in every layer (``n`` choices share a prefilled prompt)."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for bufs in self.layers:
            for b in bufs:
                b.index_copy_(0, d, b.index_select(0, s))


class PagedSequence:
    """One sequence's block table and length, plus the blocks it has booked (released with it)."""

    def __init__(self, reserved: int = 0):
        self.blocks: list[int] = []
        self.length = 0
        self.reserved = reserved

    def grow(self, pool: BlockPool, tokens: int) -> None:
        """Take blocks until ``tokens`` more fit (from this sequence's booking)."""
        need = pool.blocks_for(self.length + tokens) - len(self.blocks)
        if need > self.reserved - len(self.blocks):
            raise MoelabError(f"a sequence booked {self.reserved} blocks and needs {len(self.blocks) + need}")
        self.blocks += [pool.take() for _ in range(need)]

    def release(self, pool: BlockPool) -> None:
        """Return every block and the booking to the pool (idempotent)."""
        pool.give_back(self.blocks)
        pool.unreserve(self.reserved)
        self.blocks, self.length, self.reserved = [], 0, 0


def _slots(seq: PagedSequence, start: int, stop: int, K: int) -> list[int]:
    """Flat pool slots (``block * K + offset``) of tokens ``start..stop-1`` of ``seq``."""
    return [seq.blocks[i // K] * K + i % K for i in range(start, stop)]


class PagedBatch:
    """The cache one forward reads: B sequences, ``new_tokens`` each (prefill: B = 1; decode: T = 1).

    Takes the blocks the new tokens need on construction; :meth:`commit` after the forward counts them in
    the sequences' lengths. ``seq_len`` is the padded past ``S - T`` the model offsets its masks by.
    """

    def __init__(self, pool: BlockPool, seqs: list[PagedSequence], new_tokens: int):
        self.pool, self.seqs, self.T = pool, seqs, new_tokens
        K = pool.block_size
        for s in seqs:
            s.grow(pool, new_tokens)
        S = max(s.length for s in seqs) + new_tokens
        write, read, pad = [], [], []
        for s in seqs:
            n = s.length + new_tokens
            write += _slots(s, s.length, n, K)
            read += [0] * (S - n) + _slots(s, 0, n, K)          # slot 0: the zero block
            pad.append([0] * (S - n) + [1] * n)
        dev = pool.device
        self._write = torch.tensor(write, dtype=torch.long, device=dev)            # [B*T]
        self._read = torch.tensor(read, dtype=torch.long, device=dev)              # [B*S]
        self._padding = torch.tensor(pad, dtype=torch.long, device=dev)            # [B, S]
        self.S = S

    @property
    def seq_len(self) -> int:
        return self.S - self.T

    def padding(self) -> torch.Tensor:
        """``[B, S]`` int64: 1 = a cached or new token of this row, 0 = left padding."""
        return self._padding

    def positions(self) -> torch.Tensor:
        """``[B, T]`` RoPE positions of the new tokens (each row counts its own tokens)."""
        start = torch.tensor([s.length for s in self.seqs], device=self.pool.device)
        return start[:, None] + torch.arange(self.T, device=self.pool.device)[None]

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``new`` ``[B, T, *E]`` into the sequences' slots; return each tensor gathered as ``[B, S, *E]``."""
        B = len(self.seqs)
        out = []
        for buf, x in zip(self.pool.layers[layer], new, strict=True):
            flat = buf.view(-1, *buf.shape[2:])                                   # [(NB+1)*K, *E]
            flat.index_copy_(0, self._write, x.reshape(-1, *x.shape[2:]).to(buf.dtype))
            out.append(flat.index_select(0, self._read).view(B, self.S, *buf.shape[2:]))
        return tuple(out)

    def commit(self) -> None:
        """Count the new tokens in every sequence (call once, after the forward)."""
        for s in self.seqs:
            s.length += self.T


__all__ = ["BlockPool", "PagedBatch", "PagedSequence", "cache_shapes"]
