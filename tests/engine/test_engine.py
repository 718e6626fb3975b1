"""Engine behaviour on tiny models: segments, detection, generation, telemetry, bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from kvboost_rag import (ContextWindowError, EmptyInputError, InvalidConfigError, KVBoostEngine, MemoryStore, Segment,
                         UnsupportedModelError)
from kvboost_rag.models.loading import check_architecture, model_fingerprint

from kvboost_rag.testing.models import DOCS, tiny_config, tiny_engine, tiny_model, tiny_tokenizer


def explicit_prompt(order):
    return ([Segment.text("Context:\n")] + [s for i in order for s in (Segment.document(DOCS[i]), Segment.text("\n"))]
            + [Segment.text("Question: where is the Colosseum?\nAnswer:")])


# ---------------------------------------------------------------- segments and detection
def test_document_ids_at_query_time_equal_warm_time(engine):
    tokenized = engine.tokenize(explicit_prompt([3, 1, 0]))
    for start, end, seg in tokenized.documents:
        chunk = engine.store.get(engine.key_for_text(seg.text), engine.fingerprint)
        assert list(chunk.token_ids) == tokenized.input_ids[start:end]


def test_flat_prompt_detects_warmed_documents(engine):
    flat = "Context:\n" + "\n".join(DOCS[i] for i in (2, 0)) + "\nQuestion: where is Rome?\nAnswer:"
    segments = engine.segments(flat)
    assert [s.text for s in segments if s.is_document] == [DOCS[2], DOCS[0]]
    assert "".join(s.text for s in segments) == flat
    result = engine.generate(flat, max_new_tokens=3)
    assert result.reused_tokens > 0 and result.extra["documents_reused"] == 2


def test_detection_survives_a_fresh_engine_on_the_same_store(engine):
    other = KVBoostEngine(engine.model, engine.tokenizer, store=engine.store)
    assert len(other.detector) == len(DOCS)
    flat = "Docs: " + DOCS[1] + " Q?"
    assert other.generate(flat, max_new_tokens=2).reused_tokens > 0


def test_chat_segments_keep_documents_separate(engine):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [Segment.document(DOCS[1]), Segment.document(DOCS[0]), "Which city?"]}]
    segments = engine.chat_segments(messages)
    assert [s.text for s in segments if s.is_document] == [DOCS[1], DOCS[0]]
    flat = "".join(s.text for s in segments)
    assert flat == engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": DOCS[1] + "\n\n" + DOCS[0] + "\n\nWhich city?"}],
        tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- telemetry and generation
def test_telemetry_partitions_prompt_tokens(engine):
    r = engine.generate(explicit_prompt([1, 2, 3]), max_new_tokens=5)
    assert r.prompt_tokens == r.reused_tokens + r.recomputed_tokens + r.fresh_tokens
    assert r.reused_tokens > 0 and r.recomputed_tokens > 0 and r.fresh_tokens > 0
    assert 0 < r.ttft_s <= r.total_s
    assert r.completion_tokens == len(r.token_ids) <= 5
    assert r.strategy == "cacheblend" and r.recompute_ratio == engine.config.blend.recompute_ratio == 0.1
    again = engine.generate(explicit_prompt([3, 2, 1]), max_new_tokens=1)  # same leading text
    assert again.prefix_cached_tokens == len(engine.tokenize("Context:\n").input_ids) > 0
    assert again.telemetry()["prefix_cached_tokens"] == again.prefix_cached_tokens
    assert again.prompt_tokens == again.reused_tokens + again.recomputed_tokens + again.fresh_tokens


def test_greedy_is_deterministic_and_sampling_follows_seed(engine):
    p = explicit_prompt([0, 1])
    assert engine.generate(p, max_new_tokens=6).token_ids == engine.generate(p, max_new_tokens=6).token_ids
    a = engine.generate(p, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    b = engine.generate(p, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    assert a.token_ids == b.token_ids


def test_stop_sequence_of_several_tokens_cuts_the_answer(engine):
    p = explicit_prompt([2])
    free = engine.generate(p, max_new_tokens=12)
    assert len(free.text) > 4
    stop = free.text[3:6]  # a multi-character stop string from the middle of the answer
    stopped = engine.generate(p, max_new_tokens=12, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]


def test_stream_yields_the_same_text_and_a_result(engine):
    p = explicit_prompt([3, 0])
    seen = []
    stream = engine.stream(p, max_new_tokens=10, on_token=seen.append)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text == engine.generate(p, max_new_tokens=10).text
    assert seen == deltas


def test_eos_from_generation_config_stops():
    e = tiny_engine("llama")
    forced = e.generate("Hello there", max_new_tokens=1).token_ids[0]
    e.eos_ids = {forced}
    r = e.generate("Hello there", max_new_tokens=5)
    assert r.finish_reason == "eos" and r.token_ids == []


def test_verify_reports_agreement(engine):
    report = engine.verify([explicit_prompt([1, 0])], n_tokens=6, recompute_ratio=1.0)
    assert report["top1_agreement"] == 1.0 and report["kl_mean"] < 1e-6
    report = engine.verify([explicit_prompt([1, 0])], n_tokens=6, strategy="reuse")
    assert 0.0 <= report["top1_agreement"] <= 1.0 and report["kl_mean"] >= 0.0


# ---------------------------------------------------------------- bad input
def test_empty_prompt_is_refused(engine):
    with pytest.raises(EmptyInputError):
        engine.generate("")
    with pytest.raises(EmptyInputError):
        engine.generate([])


def test_empty_document_is_refused(engine):
    with pytest.raises(EmptyInputError):
        engine.generate([Segment.document("   "), Segment.text("Q?")])
    with pytest.raises(EmptyInputError):
        engine.encode_batch([""])


def test_prompt_over_context_window_is_refused(engine):
    with pytest.raises(ContextWindowError, match="context window"):
        engine.generate("word " * 2000, max_new_tokens=4)
    n = engine.count_tokens(explicit_prompt([0]))
    with pytest.raises(ContextWindowError):
        engine.generate(explicit_prompt([0]), max_new_tokens=engine.context_window - n + 1)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_recompute_ratio_out_of_range_is_refused(engine, ratio):
    with pytest.raises(InvalidConfigError):
        engine.generate(explicit_prompt([0]), recompute_ratio=ratio)


def test_unknown_strategy_is_refused(engine):
    with pytest.raises(InvalidConfigError):
        engine.generate(explicit_prompt([0]), strategy="magic")


# ---------------------------------------------------------------- architecture checks
@pytest.mark.parametrize("config,reason", [
    (transformers.GPT2Config(n_layer=1), "learned absolute position"),
    (transformers.BloomConfig(n_layer=1), "ALiBi"),
    (transformers.MptConfig(n_layers=1), "ALiBi"),
    (transformers.FalconConfig(num_hidden_layers=1, alibi=True), "ALiBi"),
    (transformers.MistralConfig(num_hidden_layers=1, sliding_window=4096), "sliding-window"),
    (transformers.Qwen2Config(num_hidden_layers=1, use_sliding_window=True, sliding_window=128), "sliding-window"),
    (transformers.Gemma2Config(num_hidden_layers=2), "sliding-window"),
    (transformers.LlamaConfig(num_hidden_layers=1, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                    "rope_theta": 10000.0}), "dynamic"),
])
def test_unsupported_architectures_are_refused_with_the_reason(config, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        check_architecture(config)


def test_unsupported_model_object_is_refused():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400))
    with pytest.raises(UnsupportedModelError):
        KVBoostEngine(gpt2, tiny_tokenizer())


def test_untested_architecture_warns_and_points_to_verify():
    """A model type without an adapter but with the Llama layout runs on the Llama adapter, with a
    warning; a tested one builds silently."""
    torch.manual_seed(0)
    cfg = transformers.OlmoConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=400)
    olmo = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.warns(UserWarning, match="verify"):
        KVBoostEngine(olmo, tiny_tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_architecture(tiny_config("llama"))
        KVBoostEngine(tiny_model("llama"), tiny_tokenizer())


# ---------------------------------------------------------------- fingerprints and the store
def test_fingerprint_tracks_weights_dtype_rope_and_tokenizer():
    tok = tiny_tokenizer()
    base = model_fingerprint(tiny_model("llama", seed=0), tok)
    assert base == model_fingerprint(tiny_model("llama", seed=0), tok)
    assert base != model_fingerprint(tiny_model("llama", seed=1), tok)
    assert base != model_fingerprint(tiny_model("llama", seed=0).to(torch.bfloat16), tok)
    assert base != model_fingerprint(tiny_model("llama", seed=0, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 500.0}), tok)
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["<extra>"])
    assert base != model_fingerprint(tiny_model("llama", seed=0), other_tok)


def test_store_never_serves_kv_of_another_model():
    store = MemoryStore()
    a = tiny_engine("llama", store=store)
    a.warm(DOCS[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = KVBoostEngine(tiny_model("llama", seed=5), tiny_tokenizer(), store=store)
    key = a.key_for_text(DOCS[0])
    assert b.key_for_text(DOCS[0]) != key
    assert b.store.get(key, b.fingerprint) is None  # even asked by a's key
    r = b.generate([Segment.document(DOCS[0]), Segment.text("Q?")], max_new_tokens=2)
    assert r.reused_tokens == 0 and r.recomputed_tokens == 0


def test_memory_store_evicts_least_recently_used():
    e = tiny_engine("llama")
    chunks = e.encode_batch(DOCS[:3])
    store = MemoryStore(max_bytes=chunks[0].nbytes + chunks[1].nbytes + 10)
    for i, c in enumerate(chunks[:2]):
        store.put(f"k{i}", c)
    assert store.get("k0", e.fingerprint) is not None  # k0 now most recent
    store.put("k2", chunks[2])
    assert store.contains("k0", e.fingerprint) and not store.contains("k1", e.fingerprint)
    assert store.nbytes <= store.max_bytes


def test_abandoned_stream_does_not_block_other_threads(engine):
    import threading

    stream = engine.stream(explicit_prompt([0]), max_new_tokens=20)
    next(iter(stream))  # start decoding, then walk away
    done = []
    worker = threading.Thread(target=lambda: done.append(engine.generate(explicit_prompt([1]), max_new_tokens=3)))
    worker.start()
    worker.join(timeout=60)
    assert done, "another thread could not generate while a stream was left open"
    with engine.stream(explicit_prompt([2]), max_new_tokens=20) as s2:
        next(iter(s2))
    assert s2.result is None  # closed before the end: no result


def test_detection_inside_text_segments_of_a_list(engine):
    segments = engine.segments([Segment.text("Intro\n" + DOCS[3] + "\nmore"), Segment.document(DOCS[0])])
    assert [s.text for s in segments if s.is_document] == [DOCS[3], DOCS[0]]


def test_stream_timeout_and_cancel(engine):
    with pytest.raises(TimeoutError):
        for _ in engine.stream(explicit_prompt([0]), max_new_tokens=50, timeout=1e-9):
            pass
    stream = engine.stream(explicit_prompt([0]), max_new_tokens=50)
    first = next(stream)
    stream.cancel()
    assert list(stream) == [] and first


async def test_async_stream_does_not_block_the_loop(engine):
    import asyncio

    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    stream = engine.stream(explicit_prompt([1, 2]), max_new_tokens=8)
    deltas = [d async for d in stream]
    task.cancel()
    assert "".join(deltas) == stream.result.text
    assert len(ticks) > 3


def test_blend_leaves_the_shared_model_untouched_and_is_thread_safe():
    """The blend runs layers through the family adapter and never switches the model's attention
    implementation, so two engines on one model can run from two threads: every result equals
    the same call made alone, and a plain full prefill in between is unaffected."""
    import threading

    model, tok = tiny_model("llama"), tiny_tokenizer()
    engines = [KVBoostEngine(model, tok), KVBoostEngine(model, tok)]
    impl = model.config._attn_implementation
    prompts = []
    for engine in engines:
        engine.warm(DOCS)
    for order in ([0, 1, 2], [2, 3, 0], [1, 0, 3], [3, 2, 1]):
        prompts.append([Segment.text("<|im_start|>user\n")] + [Segment.document(DOCS[i]) for i in order]
                       + [Segment.text("Question: which city?<|im_end|>\n<|im_start|>assistant\n")])
    calls = [(e, p, s) for e in engines for p in prompts for s in ("cacheblend", "full")]
    alone = [e.prefill(p, strategy=s, recompute_ratio=0.3).logits for e, p, s in calls]
    results, errors = [None] * len(calls), []

    def worker(indices):
        try:
            for i in indices:
                e, p, s = calls[i]
                results[i] = e.prefill(p, strategy=s, recompute_ratio=0.3).logits
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(range(k, len(calls), 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert model.config._attn_implementation == impl
    for got, want in zip(results, alone):
        assert torch.allclose(got, want, atol=1e-5)


def test_engine_config_is_one_validated_dataclass():
    from kvboost_rag import BlendConfig, EngineConfig

    engine = tiny_engine("llama", recompute_ratio=0.2, sink_tokens=2)
    assert engine.config == EngineConfig().replace(recompute_ratio=0.2, sink_tokens=2)
    assert engine.config.blend.recompute_ratio == 0.2 and engine.config.blend.sink_tokens == 2
    same = KVBoostEngine(tiny_model("llama"), tiny_tokenizer(),
                         config=EngineConfig(blend=BlendConfig(recompute_ratio=0.2)), sink_tokens=2)
    assert same.config == engine.config
    with pytest.raises(TypeError, match="recompute_ration"):
        tiny_engine("llama", recompute_ration=0.2)
    for bad in (dict(recompute_ratio=True), dict(recompute_ratio=1.5), dict(selection="nope"),
                dict(strategy="fast"), dict(prefix_cache_bytes=-1)):
        with pytest.raises(InvalidConfigError):
            EngineConfig().replace(**bad)


def test_dtype_auto_picks_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    """bf16 on CPUs with AMX / AVX512-BF16, float32 on others (emulated bf16 is many times slower);
    the choice is in every answer's telemetry."""
    import torch

    from kvboost_rag.models import loading as model_module

    cpu = torch.device("cpu")
    assert isinstance(model_module.cpu_has_fast_bf16(), bool)  # reads /proc/cpuinfo flags here
    monkeypatch.setattr(model_module, "cpu_has_fast_bf16", lambda: True)
    assert model_module.pick_dtype("auto", cpu) == torch.bfloat16
    assert model_module.pick_dtype(None, cpu) == torch.bfloat16
    monkeypatch.setattr(model_module, "cpu_has_fast_bf16", lambda: False)
    assert model_module.pick_dtype("auto", cpu) == torch.float32
    assert model_module.pick_dtype("float16", cpu) == torch.float16  # an explicit choice wins


def test_telemetry_names_the_dtype(engine):
    result = engine.generate(explicit_prompt([0, 1]), max_new_tokens=2)
    assert result.extra["dtype"] == str(engine.model.dtype).removeprefix("torch.")
