"""The unit of reuse: one document's KV cache, encoded alone at canonical positions.

A :class:`KVChunk` is what the store persists and what assembly fetches. Keys are stored
*after* RoPE, together with the position of their first token (``start``), so that
:mod:`kvboost_rag.kv.rope` can move them anywhere in a new prompt by a pure rotation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class KVChunk:
    """KV cache of one document.

    keys, values: ``[num_layers, num_kv_heads, num_tokens, head_dim]`` tensors.
    start: absolute position of the first token when it was encoded (after the preamble).
    token_ids: the document's token ids (exactly those it was encoded with).
    fingerprint: fingerprint of the model that computed it; a store never serves a chunk to
        a model with another fingerprint.
    text: the rendered document text (lets a fresh process detect it inside flat prompts).
    meta: free-form string metadata (encoding version, created time, ...).
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    token_ids: tuple
    fingerprint: str
    text: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape:
            raise ValueError(f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} differ in shape")
        if self.keys.dim() != 4:
            raise ValueError("keys/values must be [layers, kv_heads, tokens, head_dim]")
        if self.keys.shape[2] != len(self.token_ids):
            raise ValueError(f"chunk holds {self.keys.shape[2]} tokens but {len(self.token_ids)} token ids")

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
