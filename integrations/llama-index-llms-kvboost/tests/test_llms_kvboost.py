"""LlamaIndex KVBoostLLM, KVBoostSynthesizer and KVBoostWarmer on the tiny random model."""
from __future__ import annotations

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, CitableBlock, ImageBlock, MessageRole, TextBlock
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode

from kvboost_rag.testing.integration import SlowEngine, drain_while_ticking
from llama_index.llms.kvboost import KVBoostLLM, KVBoostSynthesizer, KVBoostWarmer, TelemetryRecorder, message_to_engine

EMBED = MockEmbedding(embed_dim=8)


def doc_message(docs, question):
    blocks = [TextBlock(text="Answer from the documents.")]
    blocks += [CitableBlock(content=[TextBlock(text=d)], title=f"d{i}", source=str(i)) for i, d in enumerate(docs)]
    blocks.append(TextBlock(text=f"Question: {question}"))
    return ChatMessage(role=MessageRole.USER, blocks=blocks)


def build_index(engine, docs, llm):
    """Ingest with the warmer as last step, then index the nodes."""
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=512), KVBoostWarmer(llm=llm)])
    nodes = pipeline.run(documents=[Document(text=d) for d in docs])
    return VectorStoreIndex(nodes, embed_model=EMBED), pipeline


def test_metadata(tiny_engine):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=7)
    meta = llm.metadata
    assert meta.context_window == tiny_engine.context_window == 1024
    assert meta.num_output == 7 and meta.is_chat_model and meta.model_name == "tiny-random-llama"
    assert KVBoostLLM(model_id="x/y", context_window=99).model_label == "x/y"


def test_lazy_llms_share_one_engine(tiny_engine, monkeypatch):
    from kvboost_rag import KVBoostEngine

    calls = []
    fake = staticmethod(lambda model=None, **kwargs: calls.append(model) or tiny_engine)
    monkeypatch.setattr(KVBoostEngine, "from_pretrained", fake)
    monkeypatch.setattr(KVBoostEngine, "_shared", {})
    first, second = (KVBoostLLM(model_id="some/model", engine_kwargs={"device": "cpu"}) for _ in range(2))
    assert first.engine is None and first.model_label == "some/model" and calls == []
    assert first.load_engine() is second.load_engine() is tiny_engine and calls == ["some/model"]


def test_message_translation(docs):
    converted = message_to_engine(doc_message(docs[:2], "why?"))
    assert [getattr(p, "kind", "str") for p in converted["content"]].count("document") == 2
    assert message_to_engine(ChatMessage(role=MessageRole.SYSTEM, content="hi")) == {"role": "system", "content": "hi"}
    with pytest.raises(ValueError, match="text-only"):
        message_to_engine(ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(url="https://example.com/a.png")]))


def test_complete_chat_and_streams(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=5)
    tiny_engine.warm(docs)
    completion = llm.complete("Context: " + docs[0] + "\nWhy?")
    assert completion.additional_kwargs["reused_tokens"] > 0 and completion.additional_kwargs["ttft_s"] > 0
    raw = llm.complete("Context: " + docs[0], formatted=True)  # sent as is, no chat template
    assert raw.additional_kwargs["prompt_tokens"] < completion.additional_kwargs["prompt_tokens"]
    chat = llm.chat([doc_message(docs[::-1], "What is a list?")])
    assert chat.message.role == MessageRole.ASSISTANT
    assert chat.additional_kwargs["reused_tokens"] > 0 and chat.additional_kwargs["completion_tokens"] <= 5
    streamed = list(llm.stream_chat([doc_message(docs, "What?")]))
    assert "".join(r.delta for r in streamed) == streamed[-1].message.content
    assert streamed[-1].additional_kwargs["reused_tokens"] > 0
    parts = list(llm.stream_complete("Hello"))
    assert parts[-1].text == "".join(p.delta for p in parts) and "ttft_s" in parts[-1].additional_kwargs


async def test_async_variants_do_not_block(tiny_engine, docs):
    llm = KVBoostLLM(engine=SlowEngine(tiny_engine, 0.05), max_new_tokens=6)
    stream = await llm.astream_chat([ChatMessage(role=MessageRole.USER, content="Hello")])
    chunks, ticks = await drain_while_ticking(stream)
    assert ticks >= 20
    assert chunks[-1].message.content == "".join(c.delta for c in chunks)
    fast = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    tiny_engine.warm(docs)
    achat = await fast.achat([doc_message(docs, "What?")])
    assert achat.additional_kwargs["reused_tokens"] > 0
    acomp = await fast.acomplete("Hello")
    assert acomp.text == fast.complete("Hello").text
    parts = [r async for r in await fast.astream_complete("Hello")]
    assert parts[-1].text == acomp.text


def test_warmer_is_idempotent_by_store(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine)
    warmer = KVBoostWarmer(engine=tiny_engine)
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=512), warmer])
    nodes = pipeline.run(documents=[Document(text=d) for d in docs])
    assert warmer.last_warmed == len(nodes) == 3
    assert all(tiny_engine.is_warm(n.get_content(metadata_mode=MetadataMode.LLM)) for n in nodes)
    again = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=512), KVBoostWarmer(llm=llm)])
    again.run(documents=[Document(text=d) for d in docs])
    assert again.transformations[-1].last_warmed == 0
    assert warmer.missing([docs[0], "something new that was never warmed at all"]) == [
        "something new that was never warmed at all"]


def test_warmer_warms_rendered_metadata(tiny_engine, docs):
    warmer = KVBoostWarmer(engine=tiny_engine)
    nodes = IngestionPipeline(transformations=[warmer]).run(
        documents=[Document(text=docs[0], metadata={"title": "Tuples"})])
    rendered = nodes[0].get_content(metadata_mode=MetadataMode.LLM)
    assert "title: Tuples" in rendered and tiny_engine.is_warm(rendered)


def test_synthesizer_hands_nodes_as_documents(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index, _ = build_index(tiny_engine, docs, llm)
    synth = KVBoostSynthesizer(llm=llm)
    with TelemetryRecorder() as rec:
        response = index.as_query_engine(llm=llm, response_synthesizer=synth, similarity_top_k=3).query("What is a tuple?")
        RetrieverQueryEngine(index.as_retriever(similarity_top_k=2), response_synthesizer=synth).query("What is a list?")
    assert isinstance(response.response, str) and len(response.source_nodes) == 3
    assert len(rec.records) == 2
    doc_tokens = sum(len(tiny_engine.tokenize_document(n.get_content(metadata_mode=MetadataMode.LLM)))
                     for n in response.source_nodes)
    record = rec.records[0]  # every node's KV came from the store; CacheBlend recomputed a share of it
    assert record["reused_tokens"] + record["recomputed_tokens"] == doc_tokens
    assert record["prompt_tokens"] == doc_tokens + record["fresh_tokens"]
    assert rec.records[1]["reused_tokens"] > 0


def test_streaming_synthesizer(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index, _ = build_index(tiny_engine, docs, llm)
    engine = index.as_query_engine(llm=llm, response_synthesizer=KVBoostSynthesizer(llm=llm, streaming=True))
    with TelemetryRecorder() as rec:
        response = engine.query("What is a tuple?")
        text = "".join(response.response_gen)
    assert rec.records and rec.records[-1]["reused_tokens"] > 0 and isinstance(text, str)


async def test_async_synthesizer(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index, _ = build_index(tiny_engine, docs, llm)
    with TelemetryRecorder() as rec:
        response = await index.as_query_engine(llm=llm, response_synthesizer=KVBoostSynthesizer(llm=llm)).aquery("What?")
    assert isinstance(response.response, str) and rec.records[-1]["reused_tokens"] > 0


def test_default_compact_query_engine_reuses_by_detection(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=4)
    index, _ = build_index(tiny_engine, docs, llm)
    with TelemetryRecorder() as rec:
        index.as_query_engine(llm=llm, similarity_top_k=3).query("What is a dictionary?")
    assert len(rec.records) == 1 and rec.records[0]["reused_tokens"] > 0


# -- no warm step: a stock query engine's nodes are stored on first use, reused on the second ------
SHORT_DOCS = [  # 125-221 characters
    "The Colosseum is an elliptical amphitheatre in the centre of Rome, Italy. Built of travertine "
    "limestone, it could hold 50,000 spectators.",
    "Paris is the capital and largest city of France. It lies on the Seine river, in the north of the "
    "country, and is known for the Eiffel Tower and the Louvre.",
]
LONG_DOCS = [SHORT_DOCS[0] + " " + SHORT_DOCS[1], SHORT_DOCS[1] + " " + SHORT_DOCS[0]]


@pytest.mark.parametrize("texts", [SHORT_DOCS, LONG_DOCS], ids=["short", "long"])
@pytest.mark.parametrize("metadata", [{}, {"file_name": "notes.txt"}], ids=["text", "with-metadata"])
def test_stock_query_engine_reuses_its_nodes_on_the_second_query(tiny_engine, texts, metadata):
    """No warmer: the compact synthesizer's flat prompt holds the retrieved nodes; they are stored
    after the first query (as the synthesizer renders them) and reused by the second."""
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=2)
    index = VectorStoreIndex.from_documents([Document(text=t, metadata=metadata) for t in texts], embed_model=EMBED)
    engine = index.as_query_engine(llm=llm, similarity_top_k=len(texts))
    first = engine.query("Where is the Colosseum?")
    assert first.metadata["kvboost"]["documents"] == len(texts) and first.metadata["kvboost"]["reused_tokens"] == 0
    assert tiny_engine.flush_write_behind(timeout=60)
    second = engine.query("Where is the Colosseum?")
    assert second.metadata["kvboost"]["documents_reused"] == len(texts)
    assert second.metadata["kvboost"]["reused_tokens"] > 0


async def test_async_query_engine_reuses_its_nodes_without_warming(tiny_engine):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=2)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in SHORT_DOCS], embed_model=EMBED)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    await engine.aquery("Where?")
    assert tiny_engine.flush_write_behind(timeout=60)
    again = await engine.aquery("Where?")
    assert again.metadata["kvboost"]["documents_reused"] == 2
    plain = llm.complete("Where is the Colosseum?")  # outside a query: no retrieved nodes
    assert plain.additional_kwargs["documents"] == 0
