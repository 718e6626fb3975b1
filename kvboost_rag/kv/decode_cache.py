"""A KV cache that grows in place while an answer is decoded.

transformers' ``DynamicCache`` appends each new token with ``torch.cat``, which copies the whole
cache of every layer at every step, a cost that grows with the prompt. :func:`with_room` moves a
prompt's cache once into buffers with room for the answer, so each step writes one slot per
layer instead: decoding over long RAG prompts gets faster, for the price of that one copy
(``benchmarks/decode_bench.py``; figures in docs/benchmarks.md).

The layers stay ``DynamicLayer``s to the rest of transformers: ``keys``/``values`` are views of
the filled part of the buffers, so sequence length, masks and ``crop`` work unchanged. Anything
that replaces those tensors (``reorder_cache``, batch selection) is noticed at the next update,
which then moves the new tensors into fresh buffers.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``update`` writes into preallocated buffers (doubling when full)."""

    def __init__(self, room: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.room = room
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    @classmethod
    def adopt(cls, keys: torch.Tensor, values: torch.Tensor, room: int) -> "InPlaceLayer":
        """A layer holding a copy of ``keys``/``values`` ([batch, heads, tokens, dim]) with
        space for ``room`` more tokens."""
        layer = cls(room=room)
        layer.lazy_initialization(keys, values)
        layer._move_to_buffers(keys, values, keys.shape[-2] + room)
        return layer

    def _filled(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def _owns_views(self) -> bool:
        return (self._key_buffer is not None and self.keys is not None and self.keys.numel() > 0
                and self.keys.data_ptr() == self._key_buffer.data_ptr()
                and self.values.data_ptr() == self._value_buffer.data_ptr())

    def _move_to_buffers(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        length = keys.shape[-2]
        shape_k = (*keys.shape[:-2], capacity, keys.shape[-1])
        shape_v = (*values.shape[:-2], capacity, values.shape[-1])
        self._key_buffer = torch.empty(shape_k, dtype=keys.dtype, device=keys.device)
        self._value_buffer = torch.empty(shape_v, dtype=values.dtype, device=values.device)
        self._key_buffer[..., :length, :].copy_(keys)
        self._value_buffer[..., :length, :].copy_(values)
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self._filled(), key_states.shape[-2]
        if length == 0:
            self._move_to_buffers(key_states, value_states, new + max(self.room, new))
            return self.keys, self.values
        if not self._owns_views() or length + new > self._key_buffer.shape[-2]:
            capacity = length + new + max(self.room, length + new)
            self._move_to_buffers(self.keys, self.values, capacity)
        end = length + new
        self._key_buffer[..., length:end, :].copy_(key_states)
        self._value_buffer[..., length:end, :].copy_(value_states)
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def with_room(cache: DynamicCache, room: int) -> DynamicCache:
    """``cache`` with every plain ``DynamicLayer`` replaced by an :class:`InPlaceLayer` holding
    its tokens plus space for ``room`` more (one copy up front instead of one per decoded token).
    Other layer kinds are left as they are."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel() > 0:
            cache.layers[index] = InPlaceLayer.adopt(layer.keys, layer.values, room)
    return cache
