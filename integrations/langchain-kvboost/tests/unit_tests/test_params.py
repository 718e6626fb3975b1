"""Constructor and call arguments: pass-through of engine options, unknown names refused."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvboost_rag.frameworks.options import engine_generation_options
from langchain_kvboost import ChatKVBoost, KVBoostLLM

ENGINE_HAS_REPETITION_PENALTY = "repetition_penalty" in (engine_generation_options() or {"repetition_penalty"})


@pytest.mark.parametrize("cls", [ChatKVBoost, KVBoostLLM])
def test_unknown_constructor_argument_is_an_error(cls, tiny_engine):
    with pytest.raises(ValidationError, match="max_new_token"):
        cls(engine=tiny_engine, max_new_token=5)  # typo of max_tokens: never silently dropped


@pytest.mark.parametrize("cls", [ChatKVBoost, KVBoostLLM])
def test_unknown_call_argument_is_an_error(cls, tiny_engine):
    model = cls(engine=tiny_engine, max_tokens=2)
    with pytest.raises(ValueError, match="unknown argument.*bogus"):
        model.invoke("Hello", bogus=1)


@pytest.mark.parametrize("cls", [ChatKVBoost, KVBoostLLM])
def test_call_arguments_override_fields(cls, tiny_engine):
    model = cls(engine=tiny_engine, max_tokens=50)
    kwargs = model._generation_kwargs(None, {"max_tokens": 3, "temperature": 0.5, "top_k": 4})
    assert kwargs["max_new_tokens"] == 3 and kwargs["temperature"] == 0.5 and kwargs["top_k"] == 4
    assert model._generation_kwargs(["x"], {})["stop"] == ["x"]


def test_model_kwargs_cannot_shadow_fields(tiny_engine):
    with pytest.raises(ValidationError, match="set them directly"):
        ChatKVBoost(engine=tiny_engine, model_kwargs={"temperature": 0.3})
    with pytest.raises(ValidationError, match="set them directly"):
        ChatKVBoost(engine=tiny_engine, model_kwargs={"max_new_tokens": 3})


def test_model_kwargs_unknown_option_is_an_error(tiny_engine):
    with pytest.raises(ValidationError, match="unknown argument.*not_an_option"):
        KVBoostLLM(engine=tiny_engine, model_kwargs={"not_an_option": 1})


@pytest.mark.skipif(ENGINE_HAS_REPETITION_PENALTY, reason="the engine implements repetition_penalty")
@pytest.mark.parametrize("cls", [ChatKVBoost, KVBoostLLM])
def test_repetition_penalty_is_refused_clearly_until_the_engine_has_it(cls, tiny_engine):
    with pytest.raises(ValidationError, match="repetition_penalty.*not supported by this kvboost-rag engine"):
        cls(engine=tiny_engine, model_kwargs={"repetition_penalty": 1.2})
    with pytest.raises(ValueError, match="repetition_penalty.*not supported"):
        cls(engine=tiny_engine, max_tokens=2).invoke("Hello", repetition_penalty=1.2)


@pytest.mark.skipif(not ENGINE_HAS_REPETITION_PENALTY, reason="the engine has no repetition_penalty yet")
def test_repetition_penalty_reaches_the_engine(tiny_engine):
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=4, model_kwargs={"repetition_penalty": 1.3})
    assert chat._generation_kwargs(None, {})["repetition_penalty"] == 1.3
    assert chat.invoke("Hello").usage_metadata["output_tokens"] <= 4


def test_model_kwargs_are_forwarded_to_the_engine(tiny_engine, monkeypatch):
    """Whatever the engine accepts passes through as is (here: an option it gains later)."""
    import kvboost_rag.frameworks.options as integration

    monkeypatch.setattr(integration, "engine_generation_options",
                        lambda: frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                           "strategy", "recompute_ratio", "timeout", "min_p"}))
    seen = {}

    class Recording:
        def __getattr__(self, name):
            return getattr(tiny_engine, name)

        def stream(self, prompt, **kwargs):
            seen.update(kwargs)
            kwargs.pop("min_p")
            return tiny_engine.stream(prompt, **kwargs)

    chat = ChatKVBoost(engine=Recording(), max_tokens=2, model_kwargs={"min_p": 0.05})
    chat.invoke("Hello")
    assert seen["min_p"] == 0.05 and seen["max_new_tokens"] == 2
