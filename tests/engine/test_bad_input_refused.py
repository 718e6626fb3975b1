"""Bad inputs refused with a KVBoostError naming the value and the fix, before anything is
written: empty stop strings, an empty strategy, blank prompts, bad verify() arguments, chat
content None, bad from_pretrained/open_store/DiskStore/engine arguments, ``--store ''``."""
from __future__ import annotations

import pytest

from kvboost_rag import KVBoostEngine, Segment
from kvboost_rag.app.cli import main
from kvboost_rag.errors import EmptyInputError, InvalidConfigError, InvalidInputError, KVBoostError, UnknownOptionError
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.memory import MemoryStore
from kvboost_rag.store.tiered import open_store
from kvboost_rag.testing.models import DOCS, tiny_engine

PROMPT = [Segment.text("Context:\n"), Segment.document(DOCS[0]), Segment.text("\nQ: where?\nA:")]


@pytest.fixture(scope="module")
def engine():
    e = tiny_engine("llama")  # write-behind on: a call that ran would queue its document
    e.warm(DOCS[1:])
    return e


def _nothing_ran(engine, call):
    """``call`` raises before generating a token or queueing a document for write-behind."""
    tokens = []
    before = engine.write_behind.stats()
    with pytest.raises(KVBoostError) as info:
        call(tokens.append)
    assert tokens == []
    assert engine.flush_write_behind(timeout=30)
    assert engine.write_behind.stats() == before
    assert not engine.store.contains(engine.key_for_text(DOCS[0]), engine.fingerprint)
    return info.value


@pytest.mark.parametrize("stop", [[""], "", ["ok", ""]])
def test_an_empty_stop_string_is_refused(engine, stop):
    err = _nothing_ran(engine, lambda on_token: engine.generate(PROMPT, stop=stop, on_token=on_token))
    assert isinstance(err, InvalidInputError) and "empty string" in str(err) and repr(stop) in str(err)
    with pytest.raises(InvalidInputError):
        engine.stream(PROMPT, stop=stop)  # refused at the call, before the stream is iterated


def test_an_empty_strategy_is_refused_not_taken_as_the_default(engine):
    err = _nothing_ran(engine, lambda on_token: engine.generate(PROMPT, strategy="", on_token=on_token))
    assert isinstance(err, InvalidConfigError) and "got ''" in str(err) and "cacheblend" in str(err)


@pytest.mark.parametrize("prompt", ["   ", "\n\t ", [" ", Segment.text("\n")], Segment.text("  "), ""])
def test_a_blank_prompt_is_refused_at_the_call(engine, prompt):
    err = _nothing_ran(engine, lambda on_token: engine.generate(prompt, on_token=on_token))
    assert isinstance(err, EmptyInputError) and "whitespace" in str(err)
    with pytest.raises(EmptyInputError):
        engine.stream(prompt)


def test_verify_needs_a_non_empty_list_of_prompts(engine):
    with pytest.raises(EmptyInputError, match=r"empty list.*engine.verify\(\[prompt\]\)"):
        engine.verify([])
    with pytest.raises(InvalidInputError, match=r"got a str 'abc'.*engine.verify\(\[prompt\]\)"):
        engine.verify("abc")
    with pytest.raises(EmptyInputError):
        engine.verify(["fine prompt", "  "])  # every prompt checked before any runs
    with pytest.raises(InvalidConfigError, match="n_tokens"):
        engine.verify(["fine prompt"], n_tokens=0)


def test_chat_content_none_only_for_assistant_messages(engine):
    with pytest.raises(InvalidInputError, match=r"message 0 \(user\) has content None"):
        engine.chat_segments([{"role": "user", "content": None}])
    with pytest.raises(InvalidInputError, match=r"message 1 \(system\) has no content"):
        engine.chat_segments([{"role": "user", "content": "hi"}, {"role": "system"}])
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}
    segments = engine.chat_segments([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": None, "tool_calls": [call]},
                                     {"role": "user", "content": "and?"}])
    assert "".join(s.text for s in segments).count("<|im_start|>assistant") == 2


@pytest.mark.parametrize("kwargs, error, words", [
    ({"store": 123}, InvalidInputError, "store must be a KVStore"),
    ({"device": "tpu"}, InvalidConfigError, "device='tpu'"),
    ({"dtype": "int8"}, InvalidConfigError, "dtype='int8'"),
    ({"store": ""}, InvalidConfigError, "store path is empty"),
    ({"store": "x", "device": "tpu"}, InvalidConfigError, "device='tpu'"),
])
def test_from_pretrained_checks_its_arguments_before_loading(kwargs, error, words, tmp_path, monkeypatch):
    import kvboost_rag.models.loading as loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "resolve_model_source", lambda *_: pytest.fail("a model was resolved"))
    with pytest.raises(error, match=words.replace("(", r"\(")):
        KVBoostEngine.from_pretrained("some/model", **kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_engine_option_is_a_kvboost_error_and_a_type_error(engine):
    with pytest.raises(UnknownOptionError, match="bogus") as info:
        KVBoostEngine(engine.model, engine.tokenizer, bogus=1)
    assert isinstance(info.value, TypeError) and isinstance(info.value, InvalidConfigError)


@pytest.mark.parametrize("make, words", [
    (lambda p: open_store(p, max_bytes=-1), "disk budget.*>= 0, got -1"),
    (lambda p: open_store(p, max_bytes="1GB"), "disk budget.*got str '1GB'.*1 << 30"),
    (lambda p: open_store(p, memory_bytes=-1), "memory budget.*memory_bytes.*got -1"),
    (lambda p: open_store(p, max_bytes=1.5), "disk budget.*whole number"),
    (lambda p: DiskStore(p, max_bytes=True), "disk budget"),
    (lambda p: MemoryStore(max_bytes=-5), "memory budget"),
])
def test_store_budgets_are_refused_at_open(make, words, tmp_path):
    root = tmp_path / "store"
    with pytest.raises(InvalidConfigError, match=words):
        make(root)
    assert not root.exists()


def test_a_store_path_must_be_a_path(tmp_path, monkeypatch):
    with pytest.raises(InvalidInputError, match="got int 123"):
        DiskStore(123)
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(InvalidConfigError, match="store path is empty"):
            DiskStore(empty)


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--verify", "--repair"], ["ask", "hi"]])
def test_cli_empty_store_is_a_one_line_error(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # '' used to mean the current directory
    (tmp_path / "notes.txt").write_text("mine")
    assert main([command[0], "--store", "", *command[1:]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "store path is empty" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
