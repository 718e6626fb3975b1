"""kvboost-rag: fast RAG answers from pre-encoded document KV caches.

Data path, top to bottom (one module per step):
documents -> :mod:`segments` (tokens) -> :mod:`encode` (KV chunks) -> :mod:`store`
-> :mod:`assemble` (fetch + :mod:`rope` re-rotation) -> :mod:`blend` (CacheBlend)
-> :mod:`generate` (answer). :mod:`engine` ties them together.
"""
__version__ = "0.1.0"
