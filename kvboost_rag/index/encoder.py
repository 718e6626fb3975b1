"""Turn documents into KV chunks: each encoded after a fixed canonical preamble, alone or after a
context of related documents (:mod:`kvboost_rag.index.context`) whose KV is then dropped.

Why a preamble: the first tokens of a sequence become attention sinks. A document encoded with
nothing before it stores sink-like KV for its first tokens, which is wrong once the document
sits in the middle of a prompt. Encoding it after an instruction-style preamble (whose KV is
then dropped) gives KV much closer to what the document has inside a real prompt.

Batching: the preamble's KV is computed once and shared by every document in a batch; each row
(context + document) is right-padded, so with a causal mask no real token ever attends to padding
(padding sits after every real token) and no attention mask is needed. A document's ``start`` is
where its first token sat: after the preamble and its own context.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.hf_compat import cache_kwargs, output_cache


class ChunkEncoder:
    """Encodes token-id lists into :class:`KVChunk` objects for one model and preamble."""

    def __init__(self, model, preamble_ids: Sequence[int], fingerprint: str, encoding_version: str) -> None:
        self.model = model
        self.preamble_ids = list(preamble_ids)
        self.fingerprint = fingerprint
        self.encoding_version = encoding_version
        self._preamble_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _preamble(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._preamble_kv is None:
            ids = torch.tensor([self.preamble_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._preamble_kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]
        return self._preamble_kv

    @torch.inference_mode()
    def encode(self, docs_ids: Sequence[Sequence[int]], texts: Sequence[str | None] | None = None,
               pad_id: int = 0, contexts: Sequence[Sequence[int]] | None = None) -> list[KVChunk]:
        """One forward pass for the whole batch; returns one chunk per document (on CPU).
        ``contexts[i]``: token ids encoded between the preamble and document ``i`` (only the
        document's KV is kept)."""
        if not docs_ids:
            return []
        texts = list(texts) if texts is not None else [None] * len(docs_ids)
        contexts = [list(c) for c in contexts] if contexts is not None else [[] for _ in docs_ids]
        batch = len(docs_ids)
        rows = [ctx + list(ids) for ctx, ids in zip(contexts, docs_ids)]
        width = max(len(row) for row in rows)
        start = len(self.preamble_ids)
        input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        cache = DynamicCache(config=self.model.config)
        if start:
            for layer_idx, (k, v) in enumerate(self._preamble()):
                cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer_idx)
        position_ids = torch.arange(start, start + width, device=self.device).unsqueeze(0).expand(batch, -1)
        out = self.model(input_ids=input_ids, position_ids=position_ids, **cache_kwargs(cache),
                         use_cache=True, logits_to_keep=1)
        layers = output_cache(out).layers
        keys = torch.stack([layer.keys[:, :, start:] for layer in layers], dim=1)  # [B, L, H, W, D]
        values = torch.stack([layer.values[:, :, start:] for layer in layers], dim=1)
        chunks = []
        for i, ids in enumerate(docs_ids):
            n, offset = len(ids), len(contexts[i])
            chunks.append(KVChunk(
                keys=keys[i, :, :, offset:offset + n].to("cpu").contiguous(),
                values=values[i, :, :, offset:offset + n].to("cpu").contiguous(),
                start=start + offset,
                token_ids=tuple(int(t) for t in ids),
                fingerprint=self.fingerprint,
                text=texts[i],
                meta={"encoding_version": self.encoding_version},
            ))
        return chunks

    @torch.inference_mode()
    def encode_after(self, ids: Sequence[int], text: str | None, neighbours: Sequence[KVChunk], rotator) -> KVChunk:
        """One document encoded after its neighbours' *stored* KV (each re-rotated to where it sits
        in the context, after the preamble): only the document's own tokens run through the model,
        so the cost is an isolated encoding's plus attention over the longer prefix. The neighbours'
        KV is their isolated encoding, an approximation of what a full forward of the context gives."""
        cache = DynamicCache(config=self.model.config)
        start = len(self.preamble_ids)
        pieces = []
        pos = start
        for chunk in neighbours:
            pieces.append((chunk, pos))
            pos += chunk.num_tokens
        preamble = self._preamble() if start else None
        dtype = next(self.model.parameters()).dtype
        for layer_idx in range(len(self.model.model.layers)):
            ks, vs = ([preamble[layer_idx][0][0]], [preamble[layer_idx][1][0]]) if preamble else ([], [])
            for chunk, at in pieces:
                k = chunk.keys[layer_idx].to(device=self.device, dtype=dtype)
                rotated = torch.empty_like(k)
                rotator.rotate_into(rotated, k, at - chunk.start)
                ks.append(rotated)
                vs.append(chunk.values[layer_idx].to(device=self.device, dtype=dtype))
            if ks:
                cache.update(torch.cat(ks, dim=1).unsqueeze(0), torch.cat(vs, dim=1).unsqueeze(0), layer_idx)
        n = len(ids)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        position_ids = torch.arange(pos, pos + n, device=self.device).unsqueeze(0)
        out = self.model(input_ids=input_ids, position_ids=position_ids, **cache_kwargs(cache),
                         use_cache=True, logits_to_keep=1)
        layers = output_cache(out).layers
        return KVChunk(
            keys=torch.stack([layer.keys[0, :, pos:pos + n] for layer in layers]).to("cpu").contiguous(),
            values=torch.stack([layer.values[0, :, pos:pos + n] for layer in layers]).to("cpu").contiguous(),
            start=pos, token_ids=tuple(int(t) for t in ids), fingerprint=self.fingerprint, text=text,
            meta={"encoding_version": self.encoding_version})
