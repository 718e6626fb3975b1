"""A padded KV buffer for a batch of decoding requests, one row per request.

The batch scheduler (:mod:`kvboost_rag.serve.scheduler`) copies each prefilled prompt's KV into a
row and runs one forward per step for every row (:func:`kvboost_rag.serve.ragged.batched_step`);
the model sees this object as its cache (``update`` / ``get_seq_length``). Rows have different
lengths: each step writes every row's new K/V at that row's own length, and an additive mask hides,
row by row, the slots past it. Design: docs/architecture.md.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["BatchKV"]


class BatchKV:
    """Per-layer K/V buffers ``[slots, kv_heads, capacity, head_dim]``, one row per active request.

    Row ``b`` holds ``lengths[b]`` tokens at positions ``0..lengths[b]-1``. The attention module
    calls :meth:`update` with the step's ``[B, kv_heads, 1, head_dim]`` K/V: each row's entry is
    written at that row's length and the filled part of every row (up to the longest) is returned;
    the mask of :meth:`step_inputs` hides, row by row, the slots past its own length, and
    :meth:`valid_lengths` tells the ragged attention path how many keys each row has.

    Growth is amortized: rows are allocated for the demand the scheduler expects (``want_slots``)
    or by doubling, capacity with 1/8 headroom in steps of 256 tokens, so a burst of requests of
    similar lengths reallocates rarely. ``zero_fill=False`` (the ragged path, which never reads
    past a row's length) skips clearing new buffers."""

    def __init__(self, zero_fill: bool = True) -> None:
        self.zero_fill = zero_fill
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self._mask: Optional[torch.Tensor] = None   # [slots, capacity] additive, kept up to date row by row
        self._rows = self._write = None
        self._kv_len = 0

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def _reallocate(self, slots: int, capacity: int, like_k: list, like_v: list) -> None:
        used = max(self.lengths, default=0)
        new_k, new_v = [], []
        for i, (k, v) in enumerate(zip(like_k, like_v)):
            # zeros for the masked path: a masked slot still enters the product (0 x NaN garbage = NaN)
            alloc = torch.zeros if self.zero_fill else torch.empty
            nk = alloc((slots, k.shape[-3], capacity, k.shape[-1]), dtype=k.dtype, device=k.device)
            nv = alloc((slots, v.shape[-3], capacity, v.shape[-1]), dtype=v.dtype, device=v.device)
            if self.keys and self.size:
                nk[: self.size, :, :used].copy_(self.keys[i][: self.size, :, :used])
                nv[: self.size, :, :used].copy_(self.values[i][: self.size, :, :used])
            new_k.append(nk)
            new_v.append(nv)
        mask = new_k[0].new_full((slots, capacity), torch.finfo(new_k[0].dtype).min)
        if self._mask is not None and self.size:
            mask[: self.size, : self._mask.shape[1]].copy_(self._mask[: self.size])
        self.keys, self.values, self._mask = new_k, new_v, mask
        self._rows = None

    def capacity_for(self, need: int) -> int:
        """The capacity the buffers have once a row needing ``need`` tokens joins."""
        if need <= self.capacity:
            return self.capacity
        return max(self.capacity, -(-(need + need // 8) // 256) * 256)

    def slots_for(self, max_slots: int, want_slots: int = 0) -> int:
        """The rows the buffers have once one more row joins."""
        if self.size < self.slots:
            return self.slots
        return max(self.size + 1, min(max_slots, max(2 * self.slots, want_slots, 1)))

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], need: int, max_slots: int,
            want_slots: int = 0) -> int:
        """Copy one prompt's per-layer ``[1, heads, n, d]`` K/V into a new row with room for
        ``need`` tokens in all; return the row index. When the buffers must grow they get
        ``want_slots`` rows (the demand the caller expects; else twice as many), at most
        ``max_slots``."""
        n = keys[0].shape[-2]
        if self.size >= self.slots or need > self.capacity:
            slots = self.slots_for(max_slots, want_slots)
            if slots == self.slots:  # growing for capacity: take the expected rows too
                slots = max(slots, min(max_slots, want_slots))
            self._reallocate(slots, self.capacity_for(need), keys if not self.keys else self.keys,
                             values if not self.values else self.values)
        row = self.size
        for i in range(len(keys)):
            self.keys[i][row, :, :n].copy_(keys[i][0])
            self.values[i][row, :, :n].copy_(values[i][0])
        self._mask[row, :n] = 0
        self._mask[row, n:] = torch.finfo(self._mask.dtype).min
        self.lengths.append(n)
        self._rows = None
        return row

    def remove(self, row: int) -> Optional[int]:
        """Drop a row; the last row moves into its place. Returns the moved row's old index."""
        last = self.size - 1
        moved = None
        if row != last:
            n = self.lengths[last]
            for k, v in zip(self.keys, self.values):
                k[row, :, :n].copy_(k[last, :, :n])
                v[row, :, :n].copy_(v[last, :, :n])
            self._mask[row].copy_(self._mask[last])
            self.lengths[row] = n
            moved = last
        self.lengths.pop()
        self._rows = None
        if not self.lengths:  # nothing left: give the memory back
            self.keys, self.values, self._mask = [], [], None
        return moved

    def step_inputs(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids ``[B, 1]`` and the additive mask ``[B, 1, 1, longest + 1]`` of the next step.

        The mask is a view of a buffer kept up to date incrementally (a row is filled when it joins;
        each step unmasks the one slot it writes), not rebuilt over the whole capacity per step."""
        b = self.size
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self._mask.device)
        self._kv_len = max(self.lengths) + 1
        if self._rows is None or self._rows.numel() != b:
            self._rows = torch.arange(b, device=self._mask.device)
        self._write = lengths
        if b == 1:
            self._mask[0, self.lengths[0]] = 0  # this step's own token
        else:
            self._mask[self._rows, lengths] = 0
        mask = self._mask[:b, : self._kv_len]
        if mask.dtype != dtype or mask.device != torch.device(device):
            mask = mask.to(device=device, dtype=dtype)
        return lengths.unsqueeze(1).to(device), mask[:, None, None, :]

    def valid_lengths(self) -> list[int]:
        """Keys each row attends in the coming step (its tokens plus the one it writes)."""
        return [n + 1 for n in self.lengths]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if key_states.dtype != k.dtype:
            key_states, value_states = key_states.to(k.dtype), value_states.to(v.dtype)
        b = self.size
        if b == 1:  # a lone row: a slice copy, as the in-place cache of a request alone does
            n = self.lengths[0]
            k[0, :, n:n + 1].copy_(key_states[0])
            v[0, :, n:n + 1].copy_(value_states[0])
        else:
            k[self._rows, :, self._write, :] = key_states[:, :, 0, :]
            v[self._rows, :, self._write, :] = value_states[:, :, 0, :]
        return k[:b, :, : self._kv_len], v[:b, :, : self._kv_len]

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths, default=0)
