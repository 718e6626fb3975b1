"""kvboost-rag: fast RAG answers from pre-encoded document KV caches.

Layers, each importing only itself and the layers below it (docs/architecture.md):
L0 ``errors``, ``validate``, ``config``, ``phases``; L1 ``kv/``, ``prompt/``, ``models/``;
L2 ``store/``, ``decode/``, ``blend/``; L3 ``prefill/``, ``index/``; L4 ``serve/``;
L5 ``engine``, ``fidelity``; L6 ``frameworks/``, ``app/``. ``testing/`` serves tests only.

Names are imported lazily so that ``kvboost-rag --help`` does not pay for importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "KVBoostEngine": "engine", "EngineConfig": "config", "Prefill": "prefill.forward", "PrefillStats": "prefill.forward",
    "TokenStream": "serve.streaming", "ModelAdapter": "models.adapters",
    "BlendConfig": "blend", "KVChunk": "kv.chunk", "GenerationResult": "decode.loop", "SamplingParams": "decode.loop",
    "Segment": "prompt.segments", "DocumentDetector": "prompt.segments", "KVStore": "store.memory", "MemoryStore": "store.memory",
    "DiskStore": "store.disk", "TieredStore": "store.disk", "open_store": "store.disk",
    "warm_corpus": "app.warm", "WarmReport": "app.warm",
    "KVBoostError": "errors", "UnsupportedModelError": "errors", "ContextWindowError": "errors",
    "EmptyInputError": "errors", "InvalidConfigError": "errors", "InvalidInputError": "errors",
    "UnknownOptionError": "errors",
    "GenerationCancelled": "errors", "StoreError": "errors",
    "ModelMismatchError": "errors", "CorruptEntryError": "errors", "PackagedModelError": "errors",
    "PackagedModelNotInstalledError": "errors", "PackagedModelCorruptError": "errors",
    "StructuredOutputError": "errors", "ToolsNotSupportedError": "errors", "SchedulerFullError": "errors",
    "json_schema_constraint": "decode.constraints", "json_object_constraint": "decode.constraints", "Constraint": "decode.constraints",
    "ToolCall": "prompt.tools", "parse_tool_calls": "frameworks.tool_calls", "render_tools": "prompt.chat",
    "generate_tool_calls": "frameworks.tool_calls",
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
