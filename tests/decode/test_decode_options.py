"""Decode-loop options (issue 13): repetition controls, and no transformers FutureWarning (the
``past_key_values`` -> ``cache`` rename) anywhere in normal use. Tiny random-weight models."""
from __future__ import annotations

import warnings

import pytest
import torch

from kvboost_rag import InvalidConfigError, SamplingParams, Segment
from kvboost_rag.kv.hf_compat import cache_keyword
from kvboost_rag.decode.penalties import Penalties

from kvboost_rag.testing.models import DOCS, tiny_engine


@pytest.fixture(scope="module")
def engine():
    e = tiny_engine("llama")
    e.warm(DOCS[:2])
    return e


def test_neutral_penalties_change_nothing(engine):
    plain = engine.generate("Tell me about Paris and Berlin.", max_new_tokens=24)
    neutral = engine.generate("Tell me about Paris and Berlin.", max_new_tokens=24, repetition_penalty=1.0,
                              frequency_penalty=0.0, presence_penalty=0.0, no_repeat_ngram_size=0)
    assert neutral.token_ids == plain.token_ids


def test_penalties_change_a_greedy_answer_and_ngram_ban_holds(engine):
    plain = engine.generate("Tell me about Paris.", max_new_tokens=40)
    assert engine.generate("Tell me about Paris.", max_new_tokens=40, repetition_penalty=2.0).token_ids != plain.token_ids
    ids = engine.generate("Tell me about Paris.", max_new_tokens=40, no_repeat_ngram_size=2).token_ids
    prompt = engine.tokenize("Tell me about Paris.").input_ids
    seq = prompt + ids
    bigrams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
    assert len(bigrams) == len(set(bigrams))


def test_penalty_arithmetic():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    p = Penalties(params, prompt_ids=[1], vocab_size=4, device="cpu")
    p.update(2)
    p.update(2)
    out = p.apply(torch.tensor([1.0, 4.0, -4.0, 1.0]))
    # id 1 (prompt): 4 / 2; id 2 (answer, twice): -4 * 2 - (0.5 * 2 + 0.25); others untouched
    assert out.tolist() == [1.0, 2.0, -9.25, 1.0]


@pytest.mark.parametrize("name,bad", [("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
                                      ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
                                      ("repetition_penalty", True), ("frequency_penalty", 3.0),
                                      ("presence_penalty", float("nan")), ("no_repeat_ngram_size", -1),
                                      ("no_repeat_ngram_size", 1.5)])
def test_bad_penalties_are_refused(engine, name, bad):
    with pytest.raises(InvalidConfigError, match=name):
        SamplingParams(**{name: bad})
    with pytest.raises(InvalidConfigError, match=name):
        engine.generate("hi", **{name: bad})


def test_cache_keyword_follows_the_installed_transformers():
    import inspect

    from transformers import LlamaForCausalLM
    expected = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    assert cache_keyword() == expected


def test_no_future_warning_in_warm_and_generate():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        e = tiny_engine("llama")
        e.warm(DOCS[:2])
        prompt = [Segment("text", "Docs: "), Segment("document", DOCS[0]), Segment("document", DOCS[1]),
                  Segment("text", " Question: which city?")]
        for strategy in ("cacheblend", "full", "reuse"):
            r = e.generate(prompt, max_new_tokens=6, strategy=strategy)
            assert r.completion_tokens >= 1
        assert e.generate(prompt, max_new_tokens=4).reused_tokens > 0
        e.verify([prompt], n_tokens=4)  # fidelity's reference decode and teacher forcing
