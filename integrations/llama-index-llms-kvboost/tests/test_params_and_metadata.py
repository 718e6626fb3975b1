"""KVBoostLLM arguments (max_tokens alias, generate_kwargs, unknown names refused) and telemetry
reaching ``Response.metadata`` of query engines with no recorder attached."""
from __future__ import annotations

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.schema import MetadataMode
from pydantic import ValidationError

from kvboost_rag.frameworks.options import engine_generation_options
from llama_index.llms.kvboost import KVBoostLLM, KVBoostSynthesizer, KVBoostWarmer

EMBED = MockEmbedding(embed_dim=8)
TELEMETRY_KEYS = {"ttft_s", "reused_tokens", "recomputed_tokens", "fresh_tokens", "prompt_tokens",
                  "documents", "documents_reused", "model_name"}
ENGINE_HAS_REPETITION_PENALTY = "repetition_penalty" in (engine_generation_options() or {"repetition_penalty"})


def user(text):
    return [ChatMessage(role=MessageRole.USER, content=text)]


# -- arguments ----------------------------------------------------------------------------------
def test_max_tokens_is_accepted_for_max_new_tokens(tiny_engine):
    llm = KVBoostLLM(engine=tiny_engine, max_tokens=3)
    assert llm.max_new_tokens == 3 and llm.metadata.num_output == 3
    assert llm.complete("Hello").additional_kwargs["completion_tokens"] <= 3
    assert llm.chat(user("Hello"), max_tokens=2).additional_kwargs["completion_tokens"] <= 2
    assert KVBoostLLM(engine=tiny_engine, max_tokens=4, max_new_tokens=4).max_new_tokens == 4
    with pytest.raises(ValidationError, match="conflicts"):
        KVBoostLLM(engine=tiny_engine, max_tokens=3, max_new_tokens=5)


def test_unknown_constructor_argument_is_an_error(tiny_engine):
    with pytest.raises(ValidationError, match="max_new_token"):
        KVBoostLLM(engine=tiny_engine, max_new_token=5)


def test_unknown_call_argument_is_an_error(tiny_engine):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown argument.*bogus"):
        llm.chat(user("Hello"), bogus=1)
    with pytest.raises(ValueError, match="unknown argument.*bogus"):
        llm.complete("Hello", bogus=1)
    with pytest.raises(ValueError, match="unknown argument.*bogus"):
        llm.stream_chat(user("Hello"), bogus=1)  # checked at the call, not at the first token


def test_generate_kwargs_checked(tiny_engine):
    with pytest.raises(ValidationError, match="set them directly"):
        KVBoostLLM(engine=tiny_engine, generate_kwargs={"temperature": 0.2})
    with pytest.raises(ValidationError, match="unknown argument.*not_an_option"):
        KVBoostLLM(engine=tiny_engine, generate_kwargs={"not_an_option": 1})


@pytest.mark.skipif(ENGINE_HAS_REPETITION_PENALTY, reason="the engine implements repetition_penalty")
def test_repetition_penalty_is_refused_clearly_until_the_engine_has_it(tiny_engine):
    with pytest.raises(ValidationError, match="repetition_penalty.*not supported by this kvboost-rag engine"):
        KVBoostLLM(engine=tiny_engine, generate_kwargs={"repetition_penalty": 1.2})
    with pytest.raises(ValueError, match="repetition_penalty.*not supported"):
        KVBoostLLM(engine=tiny_engine).complete("Hello", repetition_penalty=1.2)


@pytest.mark.skipif(not ENGINE_HAS_REPETITION_PENALTY, reason="the engine has no repetition_penalty yet")
def test_repetition_penalty_reaches_the_engine(tiny_engine):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=3, generate_kwargs={"repetition_penalty": 1.3})
    assert llm._gen_kwargs({})["repetition_penalty"] == 1.3
    assert llm.complete("Hello").additional_kwargs["completion_tokens"] <= 3


def test_generate_kwargs_are_forwarded(tiny_engine, monkeypatch):
    import kvboost_rag.frameworks.options as integration

    monkeypatch.setattr(integration, "engine_generation_options",
                        lambda: frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                           "strategy", "recompute_ratio", "timeout", "min_p"}))
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=2, generate_kwargs={"min_p": 0.05})
    assert llm._gen_kwargs({})["min_p"] == 0.05 and llm._gen_kwargs({"min_p": 0.1})["min_p"] == 0.1


# -- telemetry in Response.metadata ---------------------------------------------------------------
def _index(engine, docs, llm):
    KVBoostWarmer(llm=llm)([Document(text=d) for d in docs])
    return VectorStoreIndex.from_documents([Document(text=d) for d in docs], embed_model=EMBED)


def _check(metadata, source_nodes):
    meta = metadata["kvboost"]
    assert TELEMETRY_KEYS <= set(meta) and meta["ttft_s"] > 0 and meta["reused_tokens"] > 0
    assert meta["documents_reused"] >= 1
    assert metadata["kvboost_calls"][-1] == meta
    for node in source_nodes:  # llama-index-core's own metadata is kept
        assert node.node.node_id in metadata


def test_stock_query_engine_response_metadata(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index = _index(tiny_engine, docs, llm)
    response = index.as_query_engine(llm=llm, similarity_top_k=3).query("What is the capital of France?")
    _check(response.metadata, response.source_nodes)
    assert response.metadata["kvboost"]["documents"] == 3


def test_kvboost_synthesizer_response_metadata(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index = _index(tiny_engine, docs, llm)
    engine = index.as_query_engine(llm=llm, response_synthesizer=KVBoostSynthesizer(llm=llm), similarity_top_k=2)
    first, second = engine.query("What is a tuple?"), engine.query("Where is Rome?")
    _check(first.metadata, first.source_nodes)
    _check(second.metadata, second.source_nodes)
    assert len(first.metadata["kvboost_calls"]) == len(second.metadata["kvboost_calls"]) == 1
    doc_tokens = sum(len(tiny_engine.tokenize_document(n.get_content(metadata_mode=MetadataMode.LLM)))
                     for n in first.source_nodes)
    meta = first.metadata["kvboost"]
    assert meta["reused_tokens"] + meta["recomputed_tokens"] == doc_tokens


def test_streaming_response_metadata_arrives_at_the_end(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index = _index(tiny_engine, docs, llm)
    for synth in (KVBoostSynthesizer(llm=llm, streaming=True), None):
        kwargs = {"response_synthesizer": synth} if synth else {"streaming": True}
        response = index.as_query_engine(llm=llm, **kwargs).query("What is the capital of Italy?")
        assert "kvboost" not in response.metadata  # nothing decoded yet
        text = "".join(response.response_gen)
        assert isinstance(text, str)
        _check(response.metadata, response.source_nodes)


async def test_async_query_response_metadata(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index = _index(tiny_engine, docs, llm)
    response = await index.as_query_engine(llm=llm, response_synthesizer=KVBoostSynthesizer(llm=llm)).aquery("Why?")
    _check(response.metadata, response.source_nodes)
    stock = await index.as_query_engine(llm=llm).aquery("Where is Berlin?")
    _check(stock.metadata, stock.source_nodes)
    for kwargs in ({"response_synthesizer": KVBoostSynthesizer(llm=llm, streaming=True)}, {"streaming": True}):
        streamed = await index.as_query_engine(llm=llm, **kwargs).aquery("Where is Paris?")
        text = "".join([t async for t in streamed.async_response_gen()])
        assert isinstance(text, str)
        _check(streamed.metadata, streamed.source_nodes)


def test_llm_calls_outside_a_query_engine_are_not_collected(tiny_engine):
    from llama_index.llms.kvboost.telemetry import current_sinks

    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=2)
    llm.complete("Hello")
    assert current_sinks() == ()
