"""LangChain RAG with kvboost-rag, fully offline.

Python help topics -> all-MiniLM-L6-v2 embeddings -> a FAISS index -> warm each document's KV ->
LCEL chain (retriever -> DocumentsPrompt -> ChatKVBoost) answering three questions. For each
question it prints the answer, the time to first token with KV reuse, the reused tokens, and the
same question's TTFT with a full prefill (``strategy="full"``, no reuse).

Run: ``python examples/langchain_rag.py``
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _corpus import QUESTIONS, load_topics, minilm_path, print_row  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402

from kvboost_rag import KVBoostEngine  # noqa: E402
from langchain_kvboost import ChatKVBoost, DocumentsPrompt, warm_documents  # noqa: E402

class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 through sentence-transformers, from the packaged folder (no hub access)."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class FaissRetriever(BaseRetriever):
    """The ``k`` nearest documents by inner product of normalized embeddings, in a FAISS index.

    FAISS directly: LangChain's FAISS wrapper lived in langchain-community, which is sunset (its
    import warns), and ``faiss-cpu`` is already a kvboost-rag dependency."""

    documents: list
    embeddings: Embeddings
    index: object
    k: int = 3

    @classmethod
    def from_documents(cls, documents: list[Document], embeddings: Embeddings, k: int = 3) -> "FaissRetriever":
        vectors = np.asarray(embeddings.embed_documents([d.page_content for d in documents]), dtype="float32")
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(documents=list(documents), embeddings=embeddings, index=index, k=k)

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        vector = np.asarray([self.embeddings.embed_query(query)], dtype="float32")
        _, ids = self.index.search(vector, min(self.k, len(self.documents)))
        return [self.documents[i] for i in ids[0] if i >= 0]


SYSTEM = "You answer questions about Python concisely, using the documents you are given."


def main(questions: list[str] = QUESTIONS, *, k: int = 3, max_tokens: int = 48, engine=None) -> list[dict]:
    """Build the pipeline, answer ``questions``; returns one row of measurements per question."""
    engine = engine or KVBoostEngine.from_pretrained()
    docs = [Document(page_content=text, metadata={"topic": name}) for name, text in load_topics()]

    retriever = FaissRetriever.from_documents(docs, MiniLMEmbeddings(), k=k)

    chat = ChatKVBoost(engine=engine, max_tokens=max_tokens)
    report = warm_documents(chat, docs)  # page_content, exactly what DocumentsPrompt inserts
    print(f"warmed {report.encoded} documents ({report.tokens} tokens) in {report.seconds:.1f} s")

    prompt = {"context": retriever, "question": RunnablePassthrough()} | DocumentsPrompt(system_message=SYSTEM)
    chain = prompt | chat
    baseline = prompt | chat.bind(strategy="full")  # same prompt, plain prefill, no reuse
    chat.invoke("Hi")  # first call pays one-off kernel warm-up; keep it out of the timings

    rows = []
    for question in questions:
        answer = chain.invoke(question)
        full = baseline.invoke(question)
        meta, full_meta = answer.response_metadata, full.response_metadata
        rows.append({
            "question": question,
            "answer": answer.content,
            "ttft_s": meta["ttft_s"],
            "reused_tokens": answer.usage_metadata["input_token_details"]["cache_read"],
            "recomputed_tokens": meta["recomputed_tokens"],
            "prompt_tokens": meta["prompt_tokens"],
            "ttft_full_s": full_meta["ttft_s"],
            "answer_full": full.content,
        })
        print_row(rows[-1])
    return rows


if __name__ == "__main__":
    main()
