"""A preallocated KV cache of fixed slots: each running request owns one slot from its prefill to
its end, so requests join and leave without any cache being copied or reshaped.

Layout, per decoder layer: K and V of shape [slots, kv_heads, max_len + 1, head_dim] in the
model's dtype (views of one buffer [layers, 2, slots, kv_heads, max_len + 1, head_dim]). Column c of slot s holds the key / value of the token at position c of the
request in slot s. Column `max_len` (`scratch`) is written by rows that are only padding (empty
slots inside a decode bucket, and the padding tokens of a prefill chunk) and is never attended
to, so padding can never change a real row's cache.

Slot s is also batch row s of a decode step (rows 0..n-1 of a step are slots 0..n-1), so a decode
step reads the cache through a view, never a gather; slots are handed out lowest first to keep
the occupied ones packed at the front.

Masked columns still enter the attention's V product with weight 0, and 0 * NaN is NaN: every
column a step reads must hold finite values. So the buffers are zeroed lazily up to the widest
column read so far (on the CPU, memory that is never read is then never touched either), and a
slot's columns are zeroed again when its request leaves, so that what a broken row wrote (NaN,
inf) never reaches the slot's next request.
"""
from __future__ import annotations

import heapq

import torch


class SlotsFull(RuntimeError):
    """Every slot is taken (the engine admits at most as many requests as there are slots)."""


class SlotCache:
    """K/V buffers and slot ownership. Not thread-safe: the engine's worker thread owns it."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.slots, self.max_len, self.scratch = slots, max_len, max_len
        # one buffer for every layer's K and V, so that zeroing a slot is one operation, not 2 per layer;
        # empty, not zeros: `ready` zeroes what is about to be read, so unread memory stays untouched
        self.kv = torch.empty((layers, 2, slots, kv_heads, max_len + 1, head_dim), dtype=dtype, device=device)
        self.k = [self.kv[i, 0] for i in range(layers)]  # [slots, kv_heads, max_len + 1, head_dim] views
        self.v = [self.kv[i, 1] for i in range(layers)]
        self._zeroed = 0  # columns [0, _zeroed) of every slot hold finite values
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._taken: set[int] = set()

    @staticmethod
    def nbytes(layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
        """Bytes the K and V buffers of such a cache take."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * slots * kv_heads * (max_len + 1) * head_dim * itemsize

    # ---- ownership ----------------------------------------------------------------------------
    def acquire(self) -> int:
        """The lowest free slot, now taken; SlotsFull if none is free."""
        if not self._free:
            raise SlotsFull(f"all {self.slots} KV cache slots are taken")
        slot = heapq.heappop(self._free)
        self._taken.add(slot)
        return slot

    def release(self, slot: int, length: int) -> None:
        """Give the slot back; `length`: how many of its columns its request may have written."""
        if slot not in self._taken:
            raise ValueError(f"slot {slot} is not taken")
        length = min(max(length, 0), self.max_len)
        self.kv[:, :, slot, :, :length].zero_()
        self._taken.remove(slot)
        heapq.heappush(self._free, slot)

    @property
    def taken(self) -> int:
        return len(self._taken)

    @property
    def high(self) -> int:
        """One past the highest taken slot (0 when none is): the rows a decode step must cover."""
        return max(self._taken) + 1 if self._taken else 0

    # ---- reading ------------------------------------------------------------------------------
    def ready(self, width: int) -> None:
        """Make columns [0, width) of every slot safe to read (finite). Called before any step
        reads or writes them, so zeroing never touches a column that holds a live token."""
        width = min(width, self.max_len)
        if width <= self._zeroed:
            return
        self.kv[..., self._zeroed:width, :].zero_()
        self._zeroed = width
