"""kvboost-rag: fast RAG answers from pre-encoded document KV caches.

Data path, top to bottom (one module per step):
documents -> :mod:`segments` (tokens) -> :mod:`encode` (KV chunks) -> :mod:`store`
-> :mod:`rope` (re-rotation) -> :mod:`blend` (CacheBlend) -> :mod:`generate` (answer).
:mod:`engine` ties them together.
"""
from .blend import BlendConfig
from .chunk import KVChunk
from .engine import KVBoostEngine, Prefill, TokenStream, WarmReport
from .errors import (ContextWindowError, CorruptEntryError, EmptyInputError, InvalidConfigError, KVBoostError,
                     ModelMismatchError, StoreError, UnsupportedModelError)
from .generate import GenerationResult, SamplingParams
from .segments import DocumentDetector, Segment
from .store import KVStore, MemoryStore

__version__ = "0.1.0"


def warm_corpus(*args, **kwargs):
    """Index-time job: encode a corpus into a KV store (see :mod:`kvboost_rag.warm`)."""
    from .warm import warm_corpus as _warm_corpus
    return _warm_corpus(*args, **kwargs)


__all__ = [
    "BlendConfig", "KVChunk", "KVBoostEngine", "Prefill", "TokenStream", "WarmReport", "GenerationResult",
    "SamplingParams", "Segment", "DocumentDetector", "KVStore", "MemoryStore", "warm_corpus",
    "KVBoostError", "UnsupportedModelError", "ContextWindowError", "EmptyInputError", "InvalidConfigError",
    "StoreError", "ModelMismatchError", "CorruptEntryError", "__version__",
]
