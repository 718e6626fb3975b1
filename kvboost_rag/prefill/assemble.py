"""Where a prompt's KV comes from before the blend: stored document chunks, re-rotated to their
positions in this prompt, and the exact KV of the text before the first document.

* :func:`fetch_documents`: one verified store lookup per document segment. An entry is used only
  if it was made by this model (fingerprint) for exactly these token ids.
* :func:`assemble`: the blend buffers, with each chunk's keys moved from the position it was
  encoded at to its position here (:mod:`kvboost_rag.kv.rope`); values carry no position.
* :class:`PrefixCache`: the text in front of the first document (system prompt, instructions) sits
  at position 0 and attends only to itself, so once computed its KV is exact for every later
  prompt that starts the same way (vLLM-style prefix caching).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.keys import ENCODING_VERSION, chunk_key
from kvboost_rag.kv.rope import RopeRotator
from kvboost_rag.prompt.segments import TokenizedPrompt
from kvboost_rag.store.memory import KVStore, MemoryStore

Placed = tuple[int, KVChunk]   # (start position in the prompt, chunk)


def stored_chunk(store: KVStore, key: str, ids: Sequence[int], fingerprint: str) -> Optional[KVChunk]:
    """The entry under ``key`` if it was made by this model for exactly these token ids."""
    chunk = store.get(key, fingerprint)
    return chunk if chunk is not None and list(chunk.token_ids) == list(ids) else None


def fetch_documents(store: KVStore, tokenized: TokenizedPrompt, keys_of, fingerprint: str) -> list[Placed]:
    """Stored chunks of the prompt's documents with their start positions (misses skipped).
    ``keys_of(ids)`` lists the store keys of a document's token ids in order of preference (an
    entry encoded after a context of related documents first, then one encoded alone); the first
    that is stored is used, so a prompt may mix both kinds."""
    found = []
    for start, end, _segment in tokenized.documents:
        ids = tokenized.input_ids[start:end]
        for key in keys_of(ids):
            chunk = stored_chunk(store, key, ids, fingerprint)
            if chunk is not None:
                found.append((start, chunk))
                break
    return found


def assemble(n: int, placed: Sequence[Placed], rotator: RopeRotator, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend buffers ``[layers, kv_heads, n, head_dim]`` holding each chunk re-rotated to its
    position, and ``reused`` ([n] bool): where stored KV was placed. Other positions are left
    uninitialised: the blend computes them."""
    layers, heads, _, dim = placed[0][1].keys.shape
    keys = torch.empty((layers, heads, n, dim), dtype=dtype, device=device)
    values = torch.empty_like(keys)
    reused = torch.zeros(n, dtype=torch.bool, device=device)
    for start, chunk in placed:
        end = start + chunk.num_tokens
        k = chunk.keys.to(device=device, dtype=dtype, non_blocking=True)
        rotator.rotate_into(keys[:, :, start:end], k, start - chunk.start)
        values[:, :, start:end].copy_(chunk.values, non_blocking=True)
        reused[start:end] = True
    return keys, values, reused


class PrefixCache:
    """Exact KV of the text before a prompt's first document, kept in memory (LRU by bytes)."""

    def __init__(self, fingerprint: str, max_bytes: int) -> None:
        self.fingerprint = fingerprint
        self.store = MemoryStore(max_bytes=max_bytes)

    @staticmethod
    def prefix_ids(tokenized: TokenizedPrompt) -> list[int]:
        """Ids of the text before the first document (empty when a document comes first)."""
        return tokenized.input_ids[: tokenized.documents[0][0]] if tokenized.documents else []

    def _key(self, ids: Sequence[int]) -> str:
        return chunk_key(self.fingerprint, (), ids, ENCODING_VERSION + "/prefix")

    def fetch(self, tokenized: TokenizedPrompt) -> Optional[KVChunk]:
        ids = self.prefix_ids(tokenized)
        return stored_chunk(self.store, self._key(ids), ids, self.fingerprint) if ids else None

    def remember(self, tokenized: TokenizedPrompt, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the prefix's KV from a blend's buffers (every layer, attending only to itself)."""
        ids = self.prefix_ids(tokenized)
        if len(ids) < 2:
            return
        p = len(ids)
        self.store.put(self._key(ids), KVChunk(
            keys=keys[:, :, :p].clone(), values=values[:, :, :p].clone(), start=0,
            token_ids=tuple(ids), fingerprint=self.fingerprint, text=None, meta={"kind": "prefix"}))
