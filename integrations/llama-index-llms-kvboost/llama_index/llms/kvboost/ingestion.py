"""``KVBoostWarmer``: the last step of an ``IngestionPipeline``, encoding each node's KV.

It warms ``node.get_content(MetadataMode.LLM)``, the exact text synthesizers insert, so both the
explicit route (:class:`KVBoostSynthesizer`) and automatic detection in stock synthesizers reuse
it. Idempotent by the KV store itself: nodes whose chunk is already stored (``engine.chunk_key`` +
``store.contains``) are not encoded again, only re-registered for detection. Note that a pipeline
with an ingestion *cache* skips cached transformations entirely; with a memory store in a fresh
process, run the warmer outside the cached pipeline or use a persistent KV store.
"""
from __future__ import annotations

from typing import Any, Sequence

from llama_index.core.bridge.pydantic import Field
from llama_index.core.schema import BaseNode, MetadataMode, TransformComponent


class KVBoostWarmer(TransformComponent):
    """Warm the KV of nodes passing through; nodes are returned unchanged.

    Give it the engine (``KVBoostWarmer(engine=engine)``) or the LLM that owns it
    (``KVBoostWarmer(llm=kvboost_llm)``, loading a lazily configured LLM's model).
    """

    engine: Any = Field(default=None, exclude=True, description="The KVBoostEngine whose store receives the KV.")
    llm: Any = Field(default=None, exclude=True, description="A KVBoostLLM whose engine is used when engine is None.")
    metadata_mode: MetadataMode = Field(default=MetadataMode.LLM, description="Rendering that is warmed.")
    batch_size: int = Field(default=8, description="Documents encoded per forward pass.")
    show_progress: bool = False
    last_warmed: int = Field(default=0, description="Nodes encoded by the last call (the rest were stored already).")

    @classmethod
    def class_name(cls) -> str:
        return "KVBoostWarmer"

    def _engine(self):
        if self.engine is None:
            if self.llm is None:
                raise ValueError("KVBoostWarmer needs engine= or llm=")
            self.engine = self.llm.load_engine()
        return self.engine

    def missing(self, texts: Sequence[str]) -> list[str]:
        """Texts whose KV is not in the store yet (deduplicated, in order)."""
        engine = self._engine()
        out: list[str] = []
        for text in dict.fromkeys(t for t in texts if t.strip()):
            key = engine.chunk_key(engine.tokenize_document(text))
            if not engine.store.contains(key, engine.fingerprint):
                out.append(text)
        return out

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        engine = self._engine()
        texts = [node.get_content(metadata_mode=self.metadata_mode) for node in nodes]
        todo = self.missing(texts)
        if todo:
            engine.warm(todo, batch_size=self.batch_size, progress=self.show_progress)
        for text in set(texts) - set(todo):  # stored earlier (maybe by another process): make detectable
            if text.strip():
                engine.register_text(text)
        self.last_warmed = len(todo)
        return nodes
