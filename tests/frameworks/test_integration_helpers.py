"""kvboost_rag.frameworks.options: the framework-neutral rules both integration packages use."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvboost_rag.frameworks import options as integration
from kvboost_rag.decode.loop import SamplingParams
from kvboost_rag.errors import InvalidConfigError, InvalidInputError
from kvboost_rag.prompt.segments import Segment

SETTINGS = {"temperature": None, "max_new_tokens": 8, "top_p": 1.0, "top_k": 0, "seed": None, "stop": None,
            "strategy": None, "recompute_ratio": None, "timeout": None}


def test_no_framework_import():
    tree = ast.parse(Path(integration.__file__).read_text())
    modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.startswith(("langchain", "llama_index", "pydantic")) for m in modules)


def test_options_come_from_sampling_params():
    options = integration.engine_generation_options()
    assert options == {f.name for f in dataclasses.fields(SamplingParams)} | {"strategy", "recompute_ratio", "timeout"}
    assert "on_token" not in options and "prompt" not in options


def test_option_fields_map_an_integration_object_onto_engine_options():
    fields = ["model_id", "temperature", "max_tokens", "stop", "timeout", "streaming", "repetition_penalty"]
    assert integration.option_fields(fields) == (
        ("temperature", "temperature"), ("max_tokens", "max_new_tokens"), ("stop", "stop"), ("timeout", "timeout"),
        ("repetition_penalty", "repetition_penalty"))


def test_stop_yields_to_a_derived_constraint_in_one_place(monkeypatch):
    """The engine refuses stop with a constraint; the framework layer drops the stop when it
    derived the constraint itself (constrained_kwargs), and generate_tool_calls goes through it."""
    from kvboost_rag.decode.constraints import json_object_constraint
    from kvboost_rag.frameworks import tool_calls

    constraint = json_object_constraint()
    with pytest.raises(InvalidConfigError, match="stop"):
        SamplingParams(stop=["x"], constraint=constraint)
    kwargs = {"stop": ["x"], "max_new_tokens": 3}
    assert integration.constrained_kwargs(kwargs, constraint) == {"max_new_tokens": 3, "constraint": constraint}
    assert integration.constrained_kwargs(kwargs, None) == kwargs and kwargs == {"stop": ["x"], "max_new_tokens": 3}

    calls = []
    fake = SimpleNamespace(generate=lambda segments, **kw: calls.append(kw) or SimpleNamespace(
        text='{"name": "f", "arguments": {}}', extra={"json": {"name": "f", "arguments": {}}}),
        count_tokens=lambda prompt: 10, context_window=2048)
    turn = SimpleNamespace(segments=["s"], constraint=constraint, forced=True,
                           finish=lambda text, parsed=None: SimpleNamespace(content="", tool_calls=[parsed]))
    monkeypatch.setattr(tool_calls, "prepare_tool_turn", lambda *a, **k: turn)
    out = tool_calls.generate_tool_calls(fake, [], [], tool_choice="any", stop=["x"], max_new_tokens=9)
    # the budget of a constrained answer: what the (unbounded) schema needs, not the 9 asked for
    assert calls == [{"max_new_tokens": integration.UNBOUNDED_STRUCTURED_TOKENS, "constraint": constraint}]
    assert out.tool_calls == [{"name": "f", "arguments": {}}]


def test_generation_kwargs_merge_and_defaults():
    out = integration.generation_kwargs(SETTINGS, call={"max_tokens": 3, "stop": "x"}, owner="X")
    assert out["max_new_tokens"] == 3 and out["stop"] == ["x"] and out["temperature"] == 0.0
    assert "strategy" not in out and "timeout" not in out and "recompute_ratio" not in out
    assert integration.generation_kwargs(SETTINGS, call={"stop": []}, owner="X")["stop"] is None


def test_unknown_and_unsupported_options_are_errors():
    with pytest.raises(InvalidInputError, match="unknown argument.*'bogus'"):
        integration.generation_kwargs(SETTINGS, call={"bogus": 1}, owner="X")
    if "repetition_penalty" not in integration.engine_generation_options():
        with pytest.raises(InvalidInputError, match="repetition_penalty.*not supported by this kvboost-rag engine"):
            integration.generation_kwargs(SETTINGS, passthrough={"repetition_penalty": 1.1}, owner="X")
    with pytest.raises(InvalidConfigError, match="set them directly"):
        integration.check_generation_options({"temperature": 1}, owner="X", reserved=("temperature",),
                                             error=InvalidConfigError)
    with pytest.raises(InvalidInputError, match="conflicts"):
        integration.normalize_aliases({"max_tokens": 3, "max_new_tokens": 4}, owner="X")


def test_messages_roles_and_media():
    assert integration.engine_message("human", ["a", "b"]) == {"role": "user", "content": "ab"}
    doc = integration.document_part("a document")
    message = integration.engine_message("ai", ["x", doc])
    assert message["role"] == "assistant" and message["content"][1] == Segment.document("a document")
    assert integration.engine_role(SimpleNamespace(value="chatbot")) == "assistant"
    with pytest.raises(ValueError, match="text-only"):
        integration.refuse_media("X", "image")


def test_telemetry_and_usage():
    result = SimpleNamespace(prompt_tokens=10, completion_tokens=3, reused_tokens=6, extra={"documents": 2, "documents_reused": 1},
                             telemetry=lambda: {"ttft_s": 0.1, "reused_tokens": 6})
    assert integration.telemetry(result, "m") == {"model_name": "m", "ttft_s": 0.1, "reused_tokens": 6,
                                                 "documents": 2, "documents_reused": 1}
    assert integration.usage(result) == {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13,
                                         "cache_read_tokens": 6}


def test_structured_budget_is_what_the_schema_needs_within_the_window():
    """A structured answer's token budget: the larger of the caller's limit and what the schema
    needs (the longest text of a bounded schema; UNBOUNDED_STRUCTURED_TOKENS otherwise), within
    the room the context window leaves."""
    from pydantic import BaseModel, Field

    from kvboost_rag.decode.constraints import json_schema_constraint
    from kvboost_rag.frameworks.options import UNBOUNDED_STRUCTURED_TOKENS, structured_budget

    class Small(BaseModel):
        name: str = Field(max_length=6)
        big: bool

    class Free(BaseModel):
        answer: str

    small, free = json_schema_constraint(Small), json_schema_constraint(Free)
    longest = len('{"name": "' + '\\"' * 6 + '", "big": false}')
    assert structured_budget(small, 3, 100, 2048) == longest
    assert structured_budget(small, 500, 100, 2048) == 500  # a larger limit is kept
    assert structured_budget(free, 32, 100, 2048) == UNBOUNDED_STRUCTURED_TOKENS
    assert structured_budget(free, None, 100, 2048) == UNBOUNDED_STRUCTURED_TOKENS
    assert structured_budget(free, 32, 2000, 2048) == 48  # bounded by the context window
    assert structured_budget(free, 64, 2000, 2048) == 64  # past the room: the engine says so


@pytest.mark.parametrize("readme", ["integrations/langchain-kvboost/README.md",
                                    "integrations/llama-index-llms-kvboost/README.md"])
def test_the_integration_readmes_name_options_as_the_engine_treats_them(readme):
    """What a README says is passed through is accepted; what it says is refused is refused."""
    import re
    from pathlib import Path

    from kvboost_rag.errors import InvalidInputError
    from kvboost_rag.frameworks.options import check_generation_options

    text = " ".join(Path(__file__).resolve().parents[2].joinpath(readme).read_text().split())
    refused = re.search(r"[^.]*are refused with a message[^.]*\.", text).group(0)
    passed = re.search(r"passes further engine generation options through as is(.*?)Unknown", text).group(1)
    refused_names = [n for n in re.findall(r"`(\w+)`", refused) if n != "generate"]
    passed_names = re.findall(r'"(\w+)": ', passed) + re.findall(r"`(\w+)`", passed)
    assert refused_names and "repetition_penalty" in passed_names
    for name in refused_names:
        with pytest.raises(InvalidInputError, match="not supported"):
            check_generation_options({name: 1}, owner="X")
    for name in passed_names:
        assert name in check_generation_options({name: 1}, owner="X")
