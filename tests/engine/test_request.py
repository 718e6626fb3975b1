"""One request object: a call's options are checked once into a GenerationRequest, and a
per-request option travels inside it, unchanged, from ``generate`` to the selection rule, on the
in-thread path and through the batch scheduler alike."""
from __future__ import annotations

import dataclasses
import inspect
import threading

import pytest

from kvboost_rag import InvalidConfigError, InvalidInputError, SamplingParams, Segment
from kvboost_rag.blend import selection
from kvboost_rag.config import SELECTION_RULES
from kvboost_rag.engine import KVBoostEngine
from kvboost_rag.serve.request import GENERATION_OPTIONS, REQUEST_OPTIONS, SAMPLING_OPTIONS, GenerationRequest

from kvboost_rag.testing.models import DOCS, tiny_engine


def _prompt(i: int = 0) -> list:
    return [Segment.text("Context:\n"), Segment.document(DOCS[i]), Segment.document(DOCS[i + 1]),
            Segment.text("\nQuestion: which city?" + " why?" * i + "\nAnswer:")]


@pytest.fixture
def capture(monkeypatch):
    """A selection rule that records the ratio it is handed, then ranks as the default rule."""
    seen: list[float] = []

    def rule(ctx):
        seen.append(ctx.ratio)
        return selection.SELECTION_RULES["attention"](ctx)

    monkeypatch.setitem(SELECTION_RULES, "capture", rule)
    return seen


@pytest.mark.parametrize("batching", [False, True], ids=["in-thread", "batched"])
def test_recompute_ratio_reaches_the_selection_rule(capture, batching):
    engine = tiny_engine(write_behind=False, batching=batching, selection="capture", recompute_ratio=0.25)
    engine.warm(DOCS)
    result = engine.generate(_prompt(), max_new_tokens=2, recompute_ratio=0.37)
    assert capture == [0.37] and result.recompute_ratio == 0.37
    assert result.extra.get("batched", False) is batching
    engine.generate(_prompt(), max_new_tokens=2)  # no per-request value: the engine's
    assert capture[-1] == 0.25


def test_concurrent_batched_requests_keep_their_own_ratio(capture):
    engine = tiny_engine(write_behind=False, batching=True, selection="capture")
    engine.warm(DOCS)
    ratios = [0.2, 0.45, 0.7]
    results = [None] * len(ratios)

    def go(i):
        results[i] = engine.generate(_prompt(i), max_new_tokens=4, recompute_ratio=ratios[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(ratios))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(capture) == ratios and [r.recompute_ratio for r in results] == ratios


def test_a_ratio_set_on_the_request_is_what_its_prefill_uses(capture, engine):
    """The request carries its BlendConfig: changing it on the request is all a per-request blend
    option takes; nothing re-reads the call's arguments."""
    request = engine._request(_prompt(), max_new_tokens=1, recompute_ratio=0.3)
    assert isinstance(request, GenerationRequest) and request.blend.recompute_ratio == 0.3
    request.blend = dataclasses.replace(request.blend, selection="capture", recompute_ratio=0.55)
    pre = engine._prefill(request)
    assert capture == [0.55] and pre.stats.recompute_ratio == 0.55


def test_the_request_is_checked_once_when_built(engine):
    request = engine._request(_prompt(), strategy="reuse", recompute_ratio=0.4, max_new_tokens=3, stop="x",
                              timeout=5)
    assert request.strategy == "reuse" and request.blend.recompute_ratio == 0.0 and request.blend.sink_tokens == 0
    assert request.params == SamplingParams(max_new_tokens=3, stop=("x",)) and request.timeout == 5.0
    with pytest.raises(InvalidConfigError, match="strategy"):
        engine._request(_prompt(), strategy="fast")
    with pytest.raises(InvalidConfigError, match="recompute_ratio"):
        engine._request(_prompt(), strategy="full", recompute_ratio=2)


def test_unknown_generate_options_are_a_clear_error(engine):
    for call in (engine.generate, engine.stream, lambda p, **kw: engine.generate_batch([p], **kw)):
        with pytest.raises(InvalidInputError) as info:
            call(_prompt(), max_new_tokens=2, max_tokens=3, beams=2)
        message = str(info.value)
        assert "unexpected arguments: ['beams', 'max_tokens']" in message
        for name in GENERATION_OPTIONS | {"on_token"}:
            assert name in message
    assert isinstance(info.value, TypeError)  # what a wrong keyword always raised


def test_generation_options_are_the_sampling_params_fields():
    """The options are defined once, as SamplingParams's fields; generate, stream and
    generate_batch take them as ``**options`` (no second list of names or defaults)."""
    fields = tuple(f.name for f in dataclasses.fields(SamplingParams))
    assert SAMPLING_OPTIONS == fields
    assert GENERATION_OPTIONS == set(fields) | set(REQUEST_OPTIONS)
    for method in (KVBoostEngine.generate, KVBoostEngine.stream, KVBoostEngine.generate_batch):
        params = inspect.signature(method).parameters
        assert not set(params) & set(fields), f"{method.__name__} repeats a SamplingParams field"
        assert any(p.kind is p.VAR_KEYWORD for p in params.values())
