"""ChatKVBoost / KVBoostLLM glue, on the tiny random model (fast; answers are gibberish).

Covers both routes documents take to the engine (explicit document blocks, automatic detection in
stock chains), streaming and async paths, callbacks, stop/timeout, telemetry and lazy loading.
"""
from __future__ import annotations

import pytest
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models._utils import _normalize_messages
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder, PromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from kvboost_rag.testing.integration import SlowEngine, drain_while_ticking
from langchain_kvboost import (
    ChatKVBoost,
    DocumentsPrompt,
    KVBoostLLM,
    documents_to_message,
    is_document_block,
    message_to_engine,
    warm_documents,
)


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def _reused(message) -> int:
    return message.usage_metadata["input_token_details"]["cache_read"]


# -- explicit route ---------------------------------------------------------------------------
def test_document_block_survives_langchain_message_handling(docs):
    message = documents_to_message(docs, "What is a tuple?")
    assert [is_document_block(b) for b in message.content] == [False, True, True, True, False]
    normalized = _normalize_messages([message])[0]
    assert sum(is_document_block(b) for b in normalized.content) == 3
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), MessagesPlaceholder("history")])
    templated = prompt.invoke({"history": [message]}).to_messages()[1]
    assert sum(is_document_block(b) for b in templated.content) == 3
    assert is_document_block({"type": "text", "text": "x", "kvboost_document": True})  # top-level form


def test_message_to_engine_keeps_documents_as_segments(docs):
    converted = message_to_engine(documents_to_message(docs[:2], "Why?"))
    kinds = [getattr(p, "kind", "str") for p in converted["content"]]
    assert converted["role"] == "user" and kinds.count("document") == 2
    assert message_to_engine(SystemMessage("be brief")) == {"role": "system", "content": "be brief"}
    assert message_to_engine(AIMessage([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]))["content"] == "ab"
    with pytest.raises(ValueError, match="text-only"):
        message_to_engine(HumanMessage([{"type": "image", "url": "https://example.com/x.png"}]))


def test_explicit_documents_reuse_kv(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=4)
    report = warm_documents(chat, docs)
    assert report.encoded == 3
    result = chat.invoke([documents_to_message(docs[::-1], "What is a tuple?")])
    assert isinstance(result, AIMessage)
    assert _reused(result) > 0
    meta = result.response_metadata
    assert meta["reused_tokens"] == _reused(result)
    assert meta["ttft_s"] > 0 and meta["model_name"] == "tiny-random-llama"
    assert {"recomputed_tokens", "fresh_tokens", "finish_reason"} <= set(meta)
    usage = result.usage_metadata
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_documents_prompt_in_lcel_chain(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=4)
    warm_documents(chat, docs)
    retriever = RunnableLambda(lambda q: [Document(page_content=d) for d in docs])
    chain = {"context": retriever, "question": RunnablePassthrough()} | DocumentsPrompt(system_message="Be brief.") | chat
    result = chain.invoke("What is a list?")
    assert _reused(result) > 0


def test_uncached_documents_are_fresh(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=2)
    result = chat.invoke([documents_to_message(docs, "What?")])
    assert _reused(result) == 0 and result.response_metadata["fresh_tokens"] > 0


def test_full_strategy_reuses_nothing(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=2, strategy="full")
    warm_documents(chat, docs)
    result = chat.invoke([documents_to_message(docs, "What?")])
    assert _reused(result) == 0 and result.response_metadata["strategy"] == "full"


# -- automatic route: stock chains pasting warmed documents into a flat prompt ---------------
def test_stuff_documents_chain_reuses_warmed_documents(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=4)
    documents = [Document(page_content=d, metadata={"source": f"doc{i}"}) for i, d in enumerate(docs)]
    warm_documents(chat, documents)  # page_content: what the default document_prompt inserts
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the context:\n\n{context}"), ("human", "{input}")])
    chain = create_stuff_documents_chain(chat, prompt, output_parser=RunnableLambda(lambda m: m))
    result = chain.invoke({"context": documents[::-1], "input": "What is a dictionary?"})
    assert _reused(result) > 0


def test_custom_document_prompt_is_warmed_as_rendered(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=2)
    document_prompt = PromptTemplate.from_template("Source {source}: {page_content}")
    documents = [Document(page_content=d, metadata={"source": f"doc{i}"}) for i, d in enumerate(docs)]
    warm_documents(chat, documents, document_prompt=document_prompt)
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\nQuestion: {input}")])
    chain = create_stuff_documents_chain(chat, prompt, document_prompt=document_prompt,
                                         output_parser=RunnableLambda(lambda m: m))
    assert _reused(chain.invoke({"context": documents, "input": "What?"})) > 0


def test_lcel_format_docs_chain_reuses_warmed_documents(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=4)
    warm_documents(chat, docs)
    retriever = RunnableLambda(lambda q: [Document(page_content=d) for d in docs[1:]])
    format_docs = RunnableLambda(lambda ds: "\n\n".join(d.page_content for d in ds))
    prompt = ChatPromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}")
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | chat
    assert _reused(chain.invoke("What is a list?")) > 0


def test_llm_flat_prompt_reuses_warmed_documents(tiny_engine, docs):
    llm = KVBoostLLM(engine=tiny_engine, max_tokens=4)
    warm_documents(llm, docs)
    prompt = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}\nAnswer:")
    chain = prompt | llm
    text = chain.invoke({"context": "\n\n".join(docs), "question": "What is a tuple?"})
    assert isinstance(text, str)
    generation = llm.generate(["Context:\n" + docs[0] + "\nQ: why?"]).generations[0][0]
    assert generation.generation_info["reused_tokens"] > 0
    assert generation.generation_info["usage_metadata"]["input_token_details"]["cache_read"] > 0
    templated = KVBoostLLM(engine=tiny_engine, max_tokens=2, chat_template=True).generate([docs[1] + " Why?"])
    assert templated.generations[0][0].generation_info["reused_tokens"] > 0
    assert templated.llm_output["token_usage"]["cache_read_tokens"] > 0


# -- no warm step: a stock chain's documents are stored on first use, reused on the second ---------
SHORT_DOCS = [  # 125-221 characters, as in the issue
    "The Colosseum is an elliptical amphitheatre in the centre of Rome, Italy. Built of travertine "
    "limestone, it could hold 50,000 spectators.",
    "Paris is the capital and largest city of France. It lies on the Seine river, in the north of the "
    "country, and is known for the Eiffel Tower and the Louvre.",
    "A tuple in Python is an immutable sequence: once created its items cannot be changed, which makes "
    "tuples hashable and usable as dictionary keys and set members when their items are hashable too.",
]
LONG_DOCS = [SHORT_DOCS[0] + " " + SHORT_DOCS[1], SHORT_DOCS[2] + " " + SHORT_DOCS[1]]  # over 250 characters


class _ListRetriever(BaseRetriever):
    """A retriever returning fixed documents (what a vector store's retriever hands the chain)."""

    docs: list

    def _get_relevant_documents(self, query, *, run_manager=None):
        return [Document(page_content=d) for d in self.docs]


def _format_docs(docs):
    return "\n\n".join(d.page_content for d in docs)


def _lcel_chain(model, texts):
    prompt = ChatPromptTemplate.from_template(
        "Answer the question based only on the following context:\n{context}\n\nQuestion: {question}")
    return {"context": _ListRetriever(docs=texts) | _format_docs, "question": RunnablePassthrough()} | prompt | model


@pytest.mark.parametrize("texts", [SHORT_DOCS, LONG_DOCS], ids=["short", "long"])
def test_stock_lcel_chain_reuses_its_documents_on_the_second_call(tiny_engine, texts):
    """No warm step: the first call stores the chain's documents (the retriever's output, found in
    the flat prompt), the second reuses all of them, short or long."""
    chain = _lcel_chain(ChatKVBoost(engine=tiny_engine, max_tokens=2), texts)
    first = chain.invoke("Where is the Colosseum?")
    assert first.response_metadata["documents"] == len(texts) and _reused(first) == 0
    assert tiny_engine.flush_write_behind(timeout=60)
    second = chain.invoke("Where is the Colosseum?")
    assert _reused(second) > 0 and second.response_metadata["documents_reused"] == len(texts)


async def test_stock_chains_reuse_documents_without_warming_async_and_llm(tiny_engine):
    """The async path, ``create_stuff_documents_chain`` (documents given as input) and the text LLM."""
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=2)
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the context:\n\n{context}"),
                                               ("human", "{input}")])
    stuff = create_stuff_documents_chain(chat, prompt, output_parser=RunnableLambda(lambda m: m))
    documents = [Document(page_content=d) for d in SHORT_DOCS]
    await stuff.ainvoke({"context": documents, "input": "Where?"})
    assert tiny_engine.flush_write_behind(timeout=60)
    again = await stuff.ainvoke({"context": documents[::-1], "input": "Where?"})
    assert again.response_metadata["documents_reused"] == len(SHORT_DOCS)
    llm = KVBoostLLM(engine=tiny_engine, max_tokens=2)
    flat = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}\nAnswer:")
    chain = {"context": _ListRetriever(docs=LONG_DOCS[:2]) | _format_docs, "question": RunnablePassthrough()} | flat | llm
    chain.invoke("Where?")
    assert tiny_engine.flush_write_behind(timeout=60)
    result = (flat | llm.bind()).invoke({"context": "x", "question": "y"})  # no documents: nothing marked
    assert isinstance(result, str)
    generation = llm.generate(["Context:\n" + LONG_DOCS[0] + "\n\nQuestion: Where?"]).generations[0][0]
    assert generation.generation_info["reused_tokens"] > 0  # stored by the chain's first call


def test_a_model_outside_any_chain_sees_no_retrieved_documents(tiny_engine):
    from langchain_kvboost.retrieved import RETRIEVED

    _lcel_chain(ChatKVBoost(engine=tiny_engine, max_tokens=1), SHORT_DOCS).invoke("Where?")
    assert RETRIEVED._docs == {} and RETRIEVED._parent == {}  # every run ended: nothing kept
    plain = ChatKVBoost(engine=tiny_engine, max_tokens=1).invoke("Where is the Colosseum?")
    assert plain.response_metadata["documents"] == 0


# -- streaming, callbacks, parameters --------------------------------------------------------
def test_stream_chunks_and_callbacks(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=6)
    warm_documents(chat, docs)
    recorder = TokenRecorder()
    chunks = list(chat.stream([documents_to_message(docs, "What?")], config={"callbacks": [recorder]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert chunks[-1].chunk_position == "last"
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == "".join(recorder.tokens)
    assert _reused(full) > 0 and full.response_metadata["model_name"] == "tiny-random-llama"
    recorder2 = TokenRecorder()
    result = chat.invoke("Hello", config={"callbacks": [recorder2]})
    assert "".join(recorder2.tokens) == result.content


def test_streaming_flag_and_batch(tiny_engine):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=3, streaming=True)
    results = chat.batch(["Hello", "Hey"])
    assert len(results) == 2 and all(r.usage_metadata["output_tokens"] <= 3 for r in results)


def test_stop_sequence_cuts_the_answer(tiny_engine):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=24)
    full = chat.invoke("Hello").content
    assert len(full) > 6
    stop = full[3:6]
    cut = chat.invoke("Hello", stop=[stop]).content
    assert stop not in cut and full.startswith(cut)
    assert ChatKVBoost(engine=tiny_engine, max_tokens=24, stop=[stop]).invoke("Hello").content == cut


def test_temperature_and_seed(tiny_engine):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=8, temperature=1.0, seed=3)
    assert chat.invoke("Hello").content == chat.invoke("Hello").content
    assert chat._get_ls_params()["ls_temperature"] == 1.0


def test_timeout_raises(tiny_engine):
    with pytest.raises(TimeoutError):
        ChatKVBoost(engine=tiny_engine, max_tokens=50, timeout=1e-9).invoke("Hello")


def test_model_override_is_refused(tiny_engine):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=2)
    assert chat._get_ls_params(model="other")["ls_model_name"] == "other"
    with pytest.raises(ValueError, match="cannot switch"):
        chat.invoke("Hello", model="other")


def test_lazy_loading_shares_one_engine(tiny_engine, monkeypatch):
    from kvboost_rag import KVBoostEngine

    calls = []

    def fake_from_pretrained(model=None, **kwargs):
        calls.append((model, kwargs))
        return tiny_engine

    monkeypatch.setattr(KVBoostEngine, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(KVBoostEngine, "_shared", {})
    chat = ChatKVBoost.from_model_id("some/model", device="cpu", max_tokens=2)
    assert chat.engine is None and chat.max_tokens == 2 and calls == []
    assert chat._get_ls_params()["ls_model_name"] == "some/model"
    chat.invoke("Hello")
    assert calls == [("some/model", {"device": "cpu"})]
    llm = KVBoostLLM(engine=chat.load_engine(), max_tokens=2)
    llm.invoke("Hello")
    assert llm.engine is chat.engine and len(calls) == 1
    lazy = KVBoostLLM.from_model_id("some/model", device="cpu", max_tokens=2)  # built alike: same engine
    assert lazy.load_engine() is chat.engine and len(calls) == 1


# -- async ------------------------------------------------------------------------------------
async def test_astream_does_not_block_the_event_loop(tiny_engine, docs):
    chat = ChatKVBoost(engine=SlowEngine(tiny_engine, 0.05), max_tokens=6)
    recorder = TokenRecorder()
    chunks, ticks = await drain_while_ticking(chat.astream("Hello", config={"callbacks": [recorder]}))
    assert ticks >= 20  # ~0.3 s of decoding, the loop kept ticking
    assert chunks[-1].chunk_position == "last" and "".join(recorder.tokens) == "".join(c.content for c in chunks)


async def test_ainvoke_abatch_and_async_callbacks(tiny_engine, docs):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=4)
    warm_documents(chat, docs)
    recorder = TokenRecorder()
    result = await chat.ainvoke([documents_to_message(docs, "What?")], config={"callbacks": [recorder]})
    assert _reused(result) > 0 and "".join(recorder.tokens) == result.content
    results = await chat.abatch(["Hello", "Hey"])
    assert len(results) == 2
    llm = KVBoostLLM(engine=tiny_engine, max_tokens=4)
    text = await llm.ainvoke("Context: " + docs[0])
    assert isinstance(text, str)
    assert "".join([t async for t in llm.astream("Hello")]) == await llm.ainvoke("Hello")


async def test_async_timeout(tiny_engine):
    with pytest.raises(TimeoutError):
        await ChatKVBoost(engine=tiny_engine, max_tokens=50, timeout=1e-9).ainvoke("Hello")
