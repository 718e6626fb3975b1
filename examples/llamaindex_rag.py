"""LlamaIndex RAG with kvboost-rag, fully offline.

Python help topics -> IngestionPipeline (split, all-MiniLM-L6-v2 embeddings, KVBoostWarmer as the
last step) -> VectorStoreIndex on a FAISS vector store -> query engine whose KVBoostSynthesizer
hands the retrieved nodes to KVBoostLLM as document segments. For each of three questions it
prints the answer, TTFT with KV reuse, reused tokens, and the TTFT of the same question with a
full prefill (``strategy="full"``).

Run: ``python examples/llamaindex_rag.py``
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _corpus import QUESTIONS, load_topics, minilm_path, print_row  # noqa: E402

import faiss  # noqa: E402
from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.ingestion import IngestionPipeline  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.vector_stores.faiss import FaissVectorStore  # noqa: E402

from kvboost_rag import KVBoostEngine  # noqa: E402
from llama_index.llms.kvboost import KVBoostLLM, KVBoostSynthesizer, KVBoostWarmer  # noqa: E402

SYSTEM = "You answer questions about Python concisely, using the documents you are given."


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 through sentence-transformers, from the packaged folder (no hub access)."""

    _model: Any = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(minilm_path()), device="cpu")

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._model.encode(texts, normalize_embeddings=True).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embedding(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


def main(questions: list[str] = QUESTIONS, *, k: int = 3, max_tokens: int = 48, engine=None) -> list[dict]:
    """Build the pipeline, answer ``questions``; returns one row of measurements per question."""
    engine = engine or KVBoostEngine.from_pretrained()
    llm = KVBoostLLM(engine=engine, max_new_tokens=max_tokens)
    llm_full = KVBoostLLM(engine=engine, max_new_tokens=max_tokens, strategy="full")
    embed_model = MiniLMEmbedding()

    # The topic name is kept for display but left out of what the LLM sees, so the warmed text
    # (node.get_content(MetadataMode.LLM)) is the topic text alone.
    documents = [Document(text=text, metadata={"topic": name}, excluded_llm_metadata_keys=["topic"])
                 for name, text in load_topics()]
    warmer = KVBoostWarmer(llm=llm, show_progress=False)
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=1024, chunk_overlap=0), embed_model, warmer])
    nodes = pipeline.run(documents=documents)
    print(f"ingested {len(nodes)} nodes, warmed {warmer.last_warmed}")

    vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(384))
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                             embed_model=embed_model)
    query_engine = index.as_query_engine(
        llm=llm, similarity_top_k=k, response_synthesizer=KVBoostSynthesizer(llm=llm, system_prompt=SYSTEM))
    baseline = index.as_query_engine(
        llm=llm_full, similarity_top_k=k, response_synthesizer=KVBoostSynthesizer(llm=llm_full, system_prompt=SYSTEM))
    llm.complete("Hi")  # first call pays one-off kernel warm-up; keep it out of the timings

    rows = []
    for question in questions:
        answer = query_engine.query(question)
        full = baseline.query(question)
        # KVBoostLLM telemetry of the call that produced each answer
        reuse, no_reuse = answer.metadata["kvboost"], full.metadata["kvboost"]
        rows.append({
            "question": question,
            "answer": str(answer),
            "ttft_s": reuse["ttft_s"],
            "reused_tokens": reuse["reused_tokens"],
            "recomputed_tokens": reuse["recomputed_tokens"],
            "prompt_tokens": reuse["prompt_tokens"],
            "ttft_full_s": no_reuse["ttft_s"],
            "answer_full": str(full),
            "sources": [n.node.metadata.get("topic") for n in answer.source_nodes],
        })
        print_row(rows[-1])
    return rows


if __name__ == "__main__":
    main()
