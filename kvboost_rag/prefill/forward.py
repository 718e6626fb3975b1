"""First token: a prompt's KV cache and first-token logits, by a full prefill or by a blend.

Both are free functions over explicit inputs; :class:`~kvboost_rag.engine.KVBoostEngine` decides
which runs, holds the lock and the clock (TTFT), and fills :class:`PrefillStats`.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers import DynamicCache

from kvboost_rag.models.adapters import ModelAdapter
from kvboost_rag.prefill.assemble import Placed, assemble
from kvboost_rag.blend import BlendConfig, BlendResult, blend
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.errors import GenerationCancelled
from kvboost_rag.kv.hf_compat import output_cache
from kvboost_rag.phases import phase
from kvboost_rag.kv.rope import RopeRotator

ShouldStop = Optional[Callable[[], bool]]


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


def check_stop(should_stop: ShouldStop, where: str) -> None:
    """Raise :class:`GenerationCancelled` if ``should_stop()`` says so."""
    if should_stop is not None and should_stop():
        raise GenerationCancelled(f"stopped {where}")


@contextlib.contextmanager
def layer_checkpoints(model, adapter: ModelAdapter, should_stop: ShouldStop) -> Iterator[None]:
    """Check ``should_stop`` before every decoder layer of this thread's forward passes.

    A forward pre-hook on each layer's ``input_layernorm``, the first module a layer calls in a
    full forward and in the blend's layer runner alike, raises :class:`GenerationCancelled` when
    ``should_stop()`` is true. The hooks act only in the thread that installed them (other engines
    sharing the model run untouched) and are removed on exit, exception or not."""
    if should_stop is None:
        yield
        return
    owner = threading.get_ident()
    calls = [0]

    def hook(module, args):
        if threading.get_ident() == owner:
            calls[0] += 1
            if should_stop():
                raise GenerationCancelled(f"stopped before decoder layer pass {calls[0]}")

    handles = [layer.input_layernorm.register_forward_pre_hook(hook) for layer in adapter.layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def full_prefill(model, input_ids: torch.Tensor, *, adapter: Optional[ModelAdapter] = None,
                 should_stop: ShouldStop = None) -> tuple[torch.Tensor, DynamicCache]:
    """The baseline: one forward over the whole prompt ([N] ids). Returns (logits [vocab], cache).
    ``should_stop`` (with ``adapter``) is checked before every decoder layer."""
    with layer_checkpoints(model, adapter, should_stop) if adapter is not None else contextlib.nullcontext():
        out = model(input_ids=input_ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float(), output_cache(out)


def blended_prefill(model, adapter: ModelAdapter, input_ids: torch.Tensor, documents: Sequence[Placed],
                    prefix: Optional[KVChunk], rotator: RopeRotator, config: BlendConfig, *,
                    should_stop: ShouldStop = None) -> BlendResult:
    """Assemble the stored documents (and a cached exact prefix) at their positions, then blend.
    ``should_stop`` is checked after the assembly and before every decoder layer the blend runs."""
    with layer_checkpoints(model, adapter, should_stop):
        return _blended_prefill(model, adapter, input_ids, documents, prefix, rotator, config, should_stop)


def _blended_prefill(model, adapter, input_ids, documents, prefix, rotator, config, should_stop) -> BlendResult:
    n = input_ids.shape[0]
    placed = list(documents) + ([(0, prefix)] if prefix is not None else [])
    dtype = model.get_input_embeddings().weight.dtype
    with phase("assemble"):
        keys, values, reused = assemble(n, placed, rotator, dtype, input_ids.device)
    exact = None
    if prefix is not None:
        exact = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        exact[: prefix.num_tokens] = True
    check_stop(should_stop, "after assembling the stored KV")
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
