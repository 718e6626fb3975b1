"""Where a prompt's KV comes from before the blend: stored document chunks, re-rotated to their
positions in this prompt, and the exact KV of the text before the first document.

* :func:`fetch_documents`: one verified store lookup per document segment. An entry is used only
  if it was made by this model (fingerprint) for exactly these token ids, and (given an
  :class:`EntryCheck`) if it fits this model: shapes, dtype, ``start`` inside the context window,
  finite values in a per-layer sample, and layer-0 values equal to a fresh computation for a few of
  its tokens. Anything else is a miss, logged and counted, never a crash or a wrong answer.
* :func:`assemble`: the blend buffers, with each chunk's keys moved from the position it was
  encoded at to its position here (:mod:`kvboost_rag.kv.rope`); values carry no position.
* :class:`PrefixCache`: the text in front of the first document (system prompt, instructions) sits
  at position 0 and attends only to itself, so once computed its KV is exact for every later
  prompt that starts the same way (vLLM-style prefix caching).
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.keys import ENCODING_VERSION, chunk_key
from kvboost_rag.kv.rope import RopeRotator
from kvboost_rag.prompt.segments import TokenizedPrompt
from kvboost_rag.store.memory import KVStore, MemoryStore

Placed = tuple[int, KVChunk]   # (start position in the prompt, chunk)

log = logging.getLogger("kvboost_rag")

# Layer-0 values of a token depend only on its embedding (no attention has run yet), so a few of
# them recomputed must match what is stored: relative L2 error, int4 quantization stays far below.
LAYER0_TOLERANCE = 0.25
LAYER0_SAMPLES = 3


@dataclass(frozen=True)
class ModelShape:
    """What a usable entry looks like for one model: ``[layers, kv_heads, tokens, head_dim]``,
    a floating-point dtype, and positions inside ``context_window``."""

    layers: int
    kv_heads: int
    head_dim: int
    context_window: int


class EntryCheck:
    """Checks a fetched entry against the model it is about to be used with (see the module
    docstring); counts rejections (``rejected``; ``reasons``: the last reason per key) and logs
    each key once. ``layer0_values(ids)`` -> ``[kv_heads, len(ids), head_dim]``: fresh layer-0
    values of those token ids (None: no recomputation check).

    Per prompt it costs a float32 sum over each entry's keys of the first and last layer and values
    of one layer (which one rotates from call to call), and one batched layer-0 value projection of
    ``LAYER0_SAMPLES`` tokens per entry. A NaN or infinity the sum does not reach poisons the
    blend's logits, and :meth:`drop_non_finite` (the engine calls it then) finds it with a full
    check. What it cannot see: deeper layers of a forged entry whose checksum was recomputed
    (docs/store.md)."""

    def __init__(self, shape: ModelShape, layer0_values: Optional[Callable[[Sequence[int]], torch.Tensor]] = None):
        self.shape = shape
        self.layer0_values = layer0_values
        self.rejected = 0
        self.reasons: Dict[str, str] = {}
        self._turn = 0
        self._lock = threading.Lock()
        self._bad: "weakref.WeakValueDictionary[int, KVChunk]" = weakref.WeakValueDictionary()

    def problem(self, chunk: KVChunk, ids: Sequence[int]) -> Optional[str]:
        """Why ``chunk`` must not be used for a document of these ids, or None (layer-0 values
        apart: :meth:`layer0_problems`)."""
        if self._bad.get(id(chunk)) is chunk:  # the same object again, from a memory tier
            return self.reasons.get(getattr(chunk, "_kvboost_key", ""), "rejected before")
        if list(chunk.token_ids) != list(ids):
            return "its token ids are not the document's"
        s, n = self.shape, len(ids)
        keys, values = chunk.keys, chunk.values
        want = (s.layers, s.kv_heads, n, s.head_dim)
        if tuple(keys.shape) != want or tuple(values.shape) != want:
            return f"KV shape {tuple(keys.shape)} / {tuple(values.shape)}, this model needs {want}"
        if not (keys.is_floating_point() and values.is_floating_point()):
            return f"KV dtype {keys.dtype} / {values.dtype} is not floating point"
        start = chunk.start
        if not isinstance(start, int) or isinstance(start, bool) or start < 0 or start + n > s.context_window:
            return f"start={start!r}: its {n} tokens do not lie inside the context window (0..{s.context_window})"
        with self._lock:
            layer = self._turn % s.layers
            self._turn += 1
        total = (keys[0].sum(dtype=torch.float32) + keys[-1].sum(dtype=torch.float32)
                 + values[layer].sum(dtype=torch.float32))
        if not bool(torch.isfinite(total)):
            return f"non-finite KV (keys of layers 0 and {s.layers - 1} or values of layer {layer})"
        return None

    def layer0_problems(self, pairs: Sequence[tuple]) -> Dict[int, str]:
        """``{index: reason}`` for the ``(chunk, ids)`` pairs whose stored layer-0 values of a few
        tokens (first, middle, last) differ from a fresh computation: one batched projection."""
        if self.layer0_values is None or not pairs:
            return {}
        picks = [sorted({0, len(ids) // 2, len(ids) - 1})[:LAYER0_SAMPLES] for _, ids in pairs]
        fresh = self.layer0_values([ids[i] for (_, ids), p in zip(pairs, picks) for i in p]).float()
        out, at = {}, 0
        for index, ((chunk, _), p) in enumerate(zip(pairs, picks)):
            mine = fresh[:, at:at + len(p)]
            at += len(p)
            stored = chunk.values[0][:, p].to(device=mine.device, dtype=torch.float32)
            error = float((stored - mine).norm() / mine.norm().clamp_min(1e-6))
            if not error <= LAYER0_TOLERANCE:
                out[index] = (f"layer-0 values of tokens {p} differ from this model's ({error:.2f} relative): "
                              "not this document's KV")
        return out

    def accept(self, key: str, chunk: KVChunk, ids: Sequence[int]) -> bool:
        """Whether ``chunk`` passes :meth:`problem` (else the rejection is counted and logged)."""
        reason = self.problem(chunk, ids)
        if reason is None:
            return True
        self.reject(key, chunk, reason)
        return False

    def drop_non_finite(self, found: Sequence[tuple], key_of: Callable[[KVChunk], str]) -> list:
        """After a blend whose logits are not finite: every placed chunk with a NaN or infinity
        anywhere (a full check, paid only on this path) is rejected; returns the others."""
        kept = []
        for start, chunk in found:
            if bool(torch.isfinite(chunk.keys).all()) and bool(torch.isfinite(chunk.values).all()):
                kept.append((start, chunk))
            else:
                self.reject(key_of(chunk), chunk, "non-finite KV (NaN or infinity; found after a blend)")
        return kept

    def reject(self, key: str, chunk: Optional[KVChunk], reason: str) -> None:
        """Count and log (once per key) a rejected entry; the same chunk object (a memory tier
        hands it out again) is refused at once from now on."""
        with self._lock:
            self.rejected += 1
            first = key not in self.reasons
            self.reasons[key] = reason
            if chunk is not None:
                self._bad[id(chunk)] = chunk
                try:
                    chunk._kvboost_key = key
                except AttributeError:
                    pass
        if first:
            log.warning("kvboost-rag: stored entry %s not used (a miss): %s", key, reason)


def stored_chunk(store: KVStore, key: str, ids: Sequence[int], fingerprint: str,
                 check: Optional[EntryCheck] = None) -> Optional[KVChunk]:
    """The entry under ``key`` if it was made by this model for exactly these token ids (and
    passes ``check``'s :meth:`~EntryCheck.problem`)."""
    chunk = store.get(key, fingerprint)
    if chunk is None:
        return None
    if check is not None:
        return chunk if check.accept(key, chunk, ids) else None
    return chunk if list(chunk.token_ids) == list(ids) else None


def fetch_documents(store: KVStore, tokenized: TokenizedPrompt, keys_of, fingerprint: str,
                    check: Optional[EntryCheck] = None) -> list[Placed]:
    """Stored chunks of the prompt's documents with their start positions (misses skipped).
    ``keys_of(ids)`` lists the store keys of a document's token ids in order of preference (an
    entry encoded after a context of related documents first, then one encoded alone); the first
    that is stored and passes ``check`` is used, so a prompt may mix both kinds. The layer-0 check
    runs once for all documents; a document whose entry fails it falls back to its next key."""
    found, rest = [], []
    for start, end, _segment in tokenized.documents:
        ids = tokenized.input_ids[start:end]
        keys = list(keys_of(ids))
        for j, key in enumerate(keys):
            chunk = stored_chunk(store, key, ids, fingerprint, check)
            if chunk is not None:
                found.append((start, chunk))
                rest.append((key, ids, keys[j + 1:]))
                break
    if check is None:
        return found
    bad = check.layer0_problems([(chunk, ids) for (_, chunk), (_, ids, _) in zip(found, rest)])
    if not bad:
        return found
    kept = []
    for index, ((start, chunk), (key, ids, later)) in enumerate(zip(found, rest)):
        if index not in bad:
            kept.append((start, chunk))
            continue
        check.reject(key, chunk, bad[index])
        for other in later:  # rare: the next kind of entry, checked on its own
            chunk = stored_chunk(store, other, ids, fingerprint, check)
            if chunk is not None and not check.layer0_problems([(chunk, ids)]):
                kept.append((start, chunk))
                break
            if chunk is not None:
                check.reject(other, chunk, "layer-0 values differ from this model's: not this document's KV")
    return kept


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
