"""kvboost-rag: fast RAG answers from pre-encoded document KV caches.

Data path, top to bottom (one module per step):
documents -> :mod:`segments` (tokens) -> :mod:`encode` (KV chunks) -> :mod:`store` / :mod:`disk_store`
-> :mod:`assemble` (fetch + :mod:`rope` re-rotation) -> :mod:`blend` (CacheBlend) -> :mod:`prefill`
(first token) -> :mod:`generate` (answer). :mod:`adapters` holds what is model-family specific.
:mod:`engine` ties them together; :mod:`indexing` / :mod:`warm` are the index-time job.

Names are imported lazily so that ``kvboost-rag --help`` does not pay for importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "KVBoostEngine": "engine", "EngineConfig": "config", "Prefill": "prefill", "PrefillStats": "prefill",
    "TokenStream": "streaming", "ModelAdapter": "adapters",
    "BlendConfig": "blend", "KVChunk": "chunk", "GenerationResult": "generate", "SamplingParams": "generate",
    "Segment": "segments", "DocumentDetector": "segments", "KVStore": "store", "MemoryStore": "store",
    "DiskStore": "disk_store", "TieredStore": "disk_store", "open_store": "disk_store",
    "warm_corpus": "warm", "WarmReport": "warm",
    "KVBoostError": "errors", "UnsupportedModelError": "errors", "ContextWindowError": "errors",
    "EmptyInputError": "errors", "InvalidConfigError": "errors", "InvalidInputError": "errors",
    "GenerationCancelled": "errors", "StoreError": "errors",
    "ModelMismatchError": "errors", "CorruptEntryError": "errors", "PackagedModelError": "errors",
    "PackagedModelNotInstalledError": "errors", "PackagedModelCorruptError": "errors",
    "StructuredOutputError": "errors", "ToolsNotSupportedError": "errors", "SchedulerFullError": "errors",
    "json_schema_constraint": "structured", "json_object_constraint": "structured", "Constraint": "structured",
    "ToolCall": "tools", "parse_tool_calls": "tools", "render_tools": "tools", "generate_tool_calls": "tools",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvboost_rag' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
