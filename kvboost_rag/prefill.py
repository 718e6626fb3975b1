"""First token: a prompt's KV cache and first-token logits, by a full prefill or by a blend.

Both are free functions over explicit inputs; :class:`~kvboost_rag.engine.KVBoostEngine` decides
which runs, holds the lock and the clock (TTFT), and fills :class:`PrefillStats`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from .adapters import ModelAdapter
from .assemble import Placed, assemble
from .blend import BlendConfig, BlendResult, blend
from .chunk import KVChunk
from .rope import RopeRotator


@dataclass
class PrefillStats:
    """What producing a prompt's KV cost. Token counts partition the prompt:
    ``prompt_tokens == reused_tokens + recomputed_tokens + fresh_tokens``."""

    prompt_tokens: int
    reused_tokens: int = 0          # stored KV used as is (prefix-cache tokens included)
    recomputed_tokens: int = 0      # stored KV recomputed by the blend
    fresh_tokens: int = 0           # no stored KV: computed
    prefix_cached_tokens: int = 0   # part of reused_tokens: the text before the first document
    strategy: str = "full"
    recompute_ratio: float = 1.0
    documents: int = 0
    documents_reused: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prefill:
    """A prompt's KV cache and first-token logits, plus what producing them cost."""

    input_ids: list[int]
    cache: DynamicCache
    logits: torch.Tensor
    ttft_s: float
    stats: PrefillStats


def full_prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """The baseline: one forward over the whole prompt ([N] ids). Returns (logits [vocab], cache)."""
    out = model(input_ids=input_ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float(), out.past_key_values


def blended_prefill(model, adapter: ModelAdapter, input_ids: torch.Tensor, documents: Sequence[Placed],
                    prefix: Optional[KVChunk], rotator: RopeRotator, config: BlendConfig) -> BlendResult:
    """Assemble the stored documents (and a cached exact prefix) at their positions, then blend."""
    n = input_ids.shape[0]
    placed = list(documents) + ([(0, prefix)] if prefix is not None else [])
    dtype = model.get_input_embeddings().weight.dtype
    keys, values, reused = assemble(n, placed, rotator, dtype, input_ids.device)
    exact = None
    if prefix is not None:
        exact = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        exact[: prefix.num_tokens] = True
    return blend(model, adapter, input_ids, reused, keys, values, config,
                 documents=[(start, start + chunk.num_tokens) for start, chunk in documents], exact=exact)


def as_cache(keys: torch.Tensor, values: torch.Tensor, model_config) -> DynamicCache:
    """Wrap blend buffers ``[layers, kv_heads, N, d]`` as a DynamicCache without copying them."""
    cache = DynamicCache(config=model_config)
    if len(cache.layers) != keys.shape[0]:
        cache = DynamicCache()
        for layer_idx in range(keys.shape[0]):
            cache.update(keys[layer_idx].unsqueeze(0), values[layer_idx].unsqueeze(0), layer_idx)
        return cache
    for layer_idx, layer in enumerate(cache.layers):
        k, v = keys[layer_idx].unsqueeze(0), values[layer_idx].unsqueeze(0)
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache
