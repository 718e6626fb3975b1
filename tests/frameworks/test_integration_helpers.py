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
        text='{"name": "f", "arguments": {}}', extra={"json": {"name": "f", "arguments": {}}}))
    turn = SimpleNamespace(segments=["s"], constraint=constraint, forced=True,
                           finish=lambda text, parsed=None: SimpleNamespace(content="", tool_calls=[parsed]))
    monkeypatch.setattr(tool_calls, "prepare_tool_turn", lambda *a, **k: turn)
    out = tool_calls.generate_tool_calls(fake, [], [], tool_choice="any", stop=["x"], max_new_tokens=9)
    assert calls == [{"max_new_tokens": 9, "constraint": constraint}] and out.tool_calls == [{"name": "f", "arguments": {}}]


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
