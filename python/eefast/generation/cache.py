"""Decoding state shared by every generation mode: a slot-indexed KV cache, which slots hold
real tokens, and each slot's rotary position.

Slots are the cache's time axis. Each sequence of the batch marks its slots valid or not:
left padding, drafts the verifier rejected and tokens of finished sequences are invalid slots
that the attention mask hides. A token's rotary position is its sequence's count of valid slots
before it, so holes never shift positions. Layers may hold different numbers of slots for a
while (a draft has run only the lower layers), which is what lets speculative and threshold
decoding reuse the lower layers' KV.
"""

from __future__ import annotations

import torch


class SlotCache:
    """Per-layer keys/values in preallocated [batch, heads, capacity, dim] buffers.

    It implements the one method HF attention calls, ``update``, which appends at the layer's
    current length and returns the filled prefix.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, key, value, layer_idx, cache_kwargs=None):
        buf_k, buf_v, n = self.append(layer_idx, key.shape, key)
        q = key.shape[2]
        buf_k[:, :, n : n + q] = key
        buf_v[:, :, n : n + q] = value
        return buf_k[:, :, : n + q], buf_v[:, :, : n + q]

    def append(self, layer_idx: int, shape, like: torch.Tensor):
        """Adds ``shape``'s [batch, heads, q, dim] q slots to a layer, for the caller to fill,
        and returns (keys, values, first new slot). Buffers grow (doubling) when needed;
        ``like`` gives the dtype and device of new ones."""
        n = self.lengths[layer_idx]
        batch, heads, q, dim = shape
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or buf_k.shape[2] < n + q:
            cap = max(64, 2 * (n + q))
            new_k = like.new_empty(batch, heads, cap, dim)
            new_v = like.new_empty(batch, heads, cap, dim)
            if n:
                new_k[:, :, :n] = buf_k[:, :, :n]
                new_v[:, :, :n] = buf_v[:, :, :n]
            self.keys[layer_idx], self.values[layer_idx] = buf_k, buf_v = new_k, new_v
        self.lengths[layer_idx] = n + q
        return buf_k, buf_v, n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def truncate(self, slots: int) -> None:
        self.lengths = [min(n, slots) for n in self.lengths]

    def copy_slot(self, rows: torch.Tensor, src: torch.Tensor, dst: int, layers: int) -> None:
        """In the first ``layers`` layers, copy each batch row's slot ``src[r]`` to ``dst``."""
        for i in range(layers):
            for buf in (self.keys[i], self.values[i]):
                buf[rows, :, dst] = buf[rows, :, src]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k[rows], v[rows]


class DecodeState:
    """The batch's cache plus which slots are valid and each slot's rotary position."""

    def __init__(self, num_layers: int, batch: int, device):
        self.cache = SlotCache(num_layers)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def add_slots(self, valid: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Append slots; ``valid [batch, q]`` says which of them hold real tokens. Their
        positions follow the valid slots before them unless ``pos [batch, q]`` gives them
        (the candidates of a draft tree share one)."""
        if pos is None:
            start = self.valid.sum(1, keepdim=True)
            pos = start + valid.long().cumsum(1) - 1
        self.valid = torch.cat([self.valid, valid], 1)
        self.pos = torch.cat([self.pos, pos.clamp(min=0)], 1)

    def invalidate(self, mask: torch.Tensor, start: int) -> None:
        """Mark slots [start, start + mask.shape[1]) invalid where mask is True."""
        self.valid[:, start : start + mask.shape[1]] &= ~mask

    def truncate(self, slots: int) -> None:
        """Drop every slot from ``slots`` on, in the state and every cache layer."""
        self.valid, self.pos = self.valid[:, :slots], self.pos[:, :slots]
        self.cache.truncate(slots)

    def trim(self) -> None:
        """Drop trailing slots that no sequence uses (the batch-1 case of a KV rollback)."""
        used = self.valid.any(0).nonzero()
        self.truncate(int(used[-1]) + 1 if len(used) else 0)

    def select(self, rows: torch.Tensor) -> None:
        self.valid, self.pos = self.valid[rows], self.pos[rows]
        self.cache.select(rows)
