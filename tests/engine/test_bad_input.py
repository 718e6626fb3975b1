"""Bad input: every bad value gets a KVBoostError subclass saying what was wrong and what
is accepted, or a documented behaviour; the CLI answers with exit code 2 (usage) or 1 (error) and
one line, never a traceback. Tiny random-weight models, no downloads."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from kvboost_rag import (GenerationCancelled, InvalidConfigError, InvalidInputError, KVBoostError, SamplingParams,
                         Segment)
from kvboost_rag.app.cli import main
from kvboost_rag.app.warm import warm_corpus

from kvboost_rag.testing.models import DOCS, tiny_engine, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    model, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def doc_prompt(order=(0, 1)):
    return ([Segment.text("Context:\n")] + [Segment.document(DOCS[i]) for i in order]
            + [Segment.text("\nQuestion: which city?\nAnswer:")])


# ------------------------------------------------------------- silently accepted garbage
def test_warm_refuses_a_single_str_instead_of_warming_each_character(engine):
    before = len(engine.detector)
    for bad in ("one text that should have been in a list", b"bytes", {"text": "a dict"}, None, 42):
        with pytest.raises(InvalidInputError) as info:
            engine.warm(bad)
        assert "engine.warm" in str(info.value)
    with pytest.raises(InvalidInputError, match=r"engine\.warm\(\[text\]\)"):
        engine.warm("one text")
    assert len(engine.detector) == before


def test_a_str_stop_is_one_stop_string(engine):
    prompt = doc_prompt()
    plain = engine.generate(prompt, max_new_tokens=8)
    assert plain.text, "the tiny model generates some text"
    stop = plain.text[0] + "\u2603\u2604"  # its first character is generated; the whole string never is
    assert SamplingParams(stop="abc").stop == ("abc",)
    with_stop = engine.generate(prompt, max_new_tokens=8, stop=stop)
    assert with_stop.text == plain.text and with_stop.finish_reason == plain.finish_reason
    assert engine.generate(prompt, max_new_tokens=8, stop=[stop, plain.text[:2]]).finish_reason == "stop"
    with pytest.raises(InvalidInputError, match="stop"):
        engine.generate(prompt, max_new_tokens=2, stop=[1, 2])


@pytest.mark.parametrize("prompt", [b"What is the capital of France?", {"text": "hi"}, 12345, None,
                                    ["Context", 5], [Segment.text("a"), b"bytes"]])
def test_prompts_of_other_types_name_the_accepted_types(engine, prompt):
    for call in (lambda: engine.generate(prompt, max_new_tokens=2), lambda: engine.prefill(prompt),
                 lambda: engine.stream(prompt, max_new_tokens=2)):  # stream: at the call, before iterating
        with pytest.raises(InvalidInputError) as info:
            call()
        assert "Segment" in str(info.value)


def test_jsonl_text_that_is_not_a_string_is_a_failed_document(engine, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"id": "ok", "text": "A valid document about the river and its mountain valley."},
             {"id": "null", "text": None}, {"id": "bool", "text": True}, {"id": "int", "text": 12345},
             {"id": "list", "text": ["a", "b"]}, {"id": "ok2", "text": "Another valid document about caches."}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = warm_corpus(corpus, engine, progress=False)
    assert report.documents == 6 and report.encoded + report.skipped == 2
    failed = dict(report.failed)
    assert sorted(failed) == ["bool", "int", "list", "null"]
    assert all("must be a string" in reason for reason in failed.values())
    for word in ("None", "True", "12345"):
        assert not engine.detector.__contains__(word)


def test_recompute_ratio_must_be_a_ratio_whatever_the_strategy(engine):
    for bad in (True, False, math.nan, math.inf, 1.5, -0.1, "0.5"):
        for strategy in ("cacheblend", "reuse", "full"):
            with pytest.raises(InvalidConfigError, match="recompute_ratio"):
                engine.generate(doc_prompt(), max_new_tokens=1, strategy=strategy, recompute_ratio=bad)
            with pytest.raises(InvalidConfigError, match="recompute_ratio"):
                engine.prefill(doc_prompt(), strategy=strategy, recompute_ratio=bad)
    assert engine.prefill(doc_prompt(), recompute_ratio=1).stats.recompute_ratio == 1.0  # an int is a number


def test_temperature_and_top_p_must_be_finite_and_in_range(engine):
    for name, bad in [("temperature", math.inf), ("temperature", math.nan), ("temperature", -1.0),
                      ("temperature", True), ("temperature", "0.7"), ("top_p", 0.0), ("top_p", math.nan),
                      ("top_p", 1.5), ("top_p", math.inf), ("top_p", True), ("top_k", 2.5), ("top_k", -1)]:
        with pytest.raises(InvalidConfigError, match=name):
            engine.generate(doc_prompt(), max_new_tokens=2, **{name: bad})
        with pytest.raises(InvalidConfigError, match=name):
            SamplingParams(**{name: bad})


def test_a_segment_of_unknown_kind_or_non_str_text_is_refused():
    for kind in ("table", "Document", "", None):
        with pytest.raises(InvalidInputError, match="'text', 'document'"):
            Segment(kind, "some text")
    with pytest.raises(InvalidInputError, match="must be a str"):
        Segment("document", 123)
    assert Segment("document", "x").is_document and Segment.text("y").text == "y"


def test_cli_warm_rejects_a_negative_max_bytes_at_the_command_line(tmp_path, capsys):
    for option, value in [("--max-bytes", "-1"), ("--max-bytes", "0"), ("--batch-size", "0"),
                          ("--num-actors", "-2"), ("--max-batch-tokens", "x")]:
        with pytest.raises(SystemExit) as info:
            main(["warm", str(tmp_path / "missing.jsonl"), "--store", str(tmp_path / "s"), option, value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}" in err and "integer >= 1" in err


def test_cli_ask_rejects_bad_numbers_at_the_command_line(capsys):
    for option, value, accepted in [("--temperature", "nan", "finite number >= 0"),
                                    ("--temperature", "-1", "finite number >= 0"),
                                    ("--recompute-ratio", "1.5", "within [0, 1]"),
                                    ("--max-new-tokens", "0", "integer >= 1")]:
        with pytest.raises(SystemExit) as info:
            main(["ask", option, value, "prompt"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}" in err and accepted in err


# ------------------------------------------------------------- raw exceptions before
def test_jsonl_with_an_invalid_utf8_line_warms_the_other_lines(engine, tmp_path):
    corpus = tmp_path / "mixed.jsonl"
    good = [json.dumps({"id": f"g{i}", "text": f"Valid line {i} about the river, the layer and the store."})
            for i in range(3)]
    corpus.write_bytes((good[0] + "\n").encode() + b'{"id": "bad", "text": "caf\xe9 \xff"}\n'
                       + "\n".join(good[1:]).encode() + b"\n")
    report = warm_corpus(corpus, engine, progress=False)
    assert report.documents == 4 and report.encoded + report.skipped == 3
    (bad_id, reason), = report.failed
    assert bad_id == "mixed.jsonl:2" and "not UTF-8" in reason and "0xe9" in reason


def test_lone_surrogates_are_refused_with_their_position(engine):
    with pytest.raises(InvalidInputError, match=r"surrogate U\+D800 at character 4"):
        engine.generate("abc \ud800 def", max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="surrogate"):
        engine.generate([Segment.text("Q: "), "x\udfff"], max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="surrogate"):
        Segment.document("a document \ud800")
    report = engine.warm(["A fine document about the river and the mountain store.", "bad \ud834 document text"])
    assert report.encoded + report.skipped == 1
    (_, reason), = report.failed
    assert "surrogate U+D834" in reason


def test_counts_and_seed_must_be_integers(engine):
    for bad in (2.5, math.nan, "3", True, 0, -1):
        with pytest.raises(InvalidConfigError, match="max_new_tokens"):
            engine.generate(doc_prompt(), max_new_tokens=bad)
    assert engine.generate(doc_prompt(), max_new_tokens=3.0).completion_tokens <= 3  # a whole float is accepted
    for bad in ("abc", 1.5, True, -1, 2 ** 64):
        with pytest.raises(InvalidConfigError, match="seed"):
            engine.generate(doc_prompt(), max_new_tokens=2, temperature=0.8, seed=bad)
    with pytest.raises(InvalidConfigError, match="max_new_tokens"):
        engine.prefill(doc_prompt(), max_new_tokens=1.5)


@pytest.mark.parametrize("messages, match", [
    ([{"content": "hi"}], "has no 'role'"),
    ([{"role": "wizard", "content": "hi"}], "accepted roles: system, user, assistant"),
    ([{"role": "user", "content": 42}], "must be a str or a list"),
    ([{"role": "user", "content": ["ok", 3.5]}], "parts must be str or Segment"),
    ([{"role": "user", "content": "bad \ud800"}], "surrogate"),
    ("user: hi", "list of"),
    ([["user", "hi"]], "must be a dict"),
])
def test_malformed_chat_messages(engine, messages, match):
    with pytest.raises(InvalidInputError, match=match):
        engine.chat_segments(messages)


def test_chat_message_content_none_is_empty(engine):
    segments = engine.chat_segments([{"role": "assistant", "content": None}, {"role": "user", "content": "hi"}])
    assert "".join(s.text for s in segments).count("<|im_start|>assistant") == 2


def test_cli_ask_with_a_binary_doc_is_a_one_line_error(tmp_path, tiny_model_dir, capsys):
    blob = tmp_path / "image.png"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    rc = main(["ask", "--store", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--device", "cpu",
               "--max-new-tokens", "1", "--doc", str(blob), "Summarise."])
    err = capsys.readouterr().err
    assert rc == 1
    assert "image.png" in err and "not UTF-8 text" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_model_folder_that_is_not_a_model(tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    rc = main(["ask", "--store", str(tmp_path / "s"), "--model", str(folder), "--device", "cpu", "hi"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert str(folder) in err and "is not a model folder" in err and "config.json" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_warm_of_an_empty_folder_warns_and_fails(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG")  # no .txt / .md file
    rc = main(["warm", str(empty), "--store", str(tmp_path / "s"), "--model", str(tiny_model_dir),
               "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "warning: no documents found" in err and ".txt / .md" in err
    with pytest.raises(SystemExit):
        main(["warm", "--help"])
    assert "exits with code 1" in capsys.readouterr().out


# ------------------------------------------------------------- timeout bounds the prefill
class FakeClock:
    """The stream's deadline clock, advanced only by the slowed layers: deterministic."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def slow_layers(monkeypatch, model, clock, seconds=1.0):
    """Each decoder layer's MLP "takes" ``seconds`` on the fake clock; returns the call counter."""
    calls = [0]
    for layer in model.model.layers:
        original = layer.mlp.forward

        def forward(x, _original=original):
            calls[0] += 1
            clock.t += seconds
            return _original(x)

        monkeypatch.setattr(layer.mlp, "forward", forward)
    return calls


@pytest.mark.parametrize("strategy", ["full", "cacheblend"])
def test_timeout_bounds_the_prefill(monkeypatch, strategy):
    import kvboost_rag.serve.streaming as streaming

    e = tiny_engine("llama")
    e.warm(DOCS)
    clock = FakeClock()
    monkeypatch.setattr(streaming, "_clock", clock, raising=False)
    calls = slow_layers(monkeypatch, e.model, clock)
    prompt = doc_prompt((0, 1, 2, 3))
    e.generate(prompt, max_new_tokens=4, strategy=strategy)  # unbounded: how many layer runs a call makes
    unbounded, calls[0] = calls[0], 0
    assert unbounded > e.model.config.num_hidden_layers
    clock.t = 0.0
    with pytest.raises(TimeoutError, match="timeout=2.5"):
        "".join(e.stream(prompt, max_new_tokens=4, strategy=strategy, timeout=2.5))
    assert calls[0] == 3, "stopped before the first layer that starts past the deadline, inside the prefill"
    clock.t, calls[0] = 0.0, 0
    with pytest.raises(TimeoutError):  # generate takes the same timeout
        e.generate(prompt, max_new_tokens=4, strategy=strategy, timeout=1.5)
    assert calls[0] == 2
    # nothing is left on the shared model: no hook, and a full prefill still gives the same logits
    assert all(not layer.input_layernorm._forward_pre_hooks for layer in e.model.model.layers)
    clock.t, calls[0] = 0.0, 0
    stream = e.stream(prompt, max_new_tokens=4, strategy=strategy, timeout=1e9)
    assert "".join(stream) == stream.result.text


def test_a_prefill_that_raises_mid_blend_leaves_the_model_working(engine):
    want = engine.prefill(doc_prompt(), strategy="full").logits
    stops = iter([False, False, True])  # the third check (mid-blend) says stop
    with pytest.raises(GenerationCancelled):
        engine.prefill(doc_prompt(), strategy="cacheblend", should_stop=lambda: next(stops))
    assert all(not layer.input_layernorm._forward_pre_hooks for layer in engine.model.model.layers)
    assert torch.equal(engine.prefill(doc_prompt(), strategy="full").logits, want)
    assert engine.prefill(doc_prompt(), strategy="cacheblend").stats.documents_reused == 2


def test_layer_checks_act_only_in_their_own_thread(engine):
    from kvboost_rag.prefill.forward import layer_checkpoints

    want = engine.prefill(doc_prompt(), strategy="full").logits
    other = type(engine)(engine.model, engine.tokenizer, store=engine.store)
    got, errors = [], []

    def worker():
        try:
            got.append(other.prefill(doc_prompt(), strategy="full").logits)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with layer_checkpoints(engine.model, engine.adapter, lambda: True):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        with pytest.raises(GenerationCancelled):
            engine.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert not errors and torch.allclose(got[0], want, atol=1e-6)


def test_timeout_must_be_a_positive_finite_number(engine):
    for bad in (0, -1, math.nan, "5", True):
        with pytest.raises(InvalidConfigError, match="timeout"):
            engine.stream(doc_prompt(), timeout=bad)
    with pytest.raises(InvalidInputError, match="unexpected arguments"):
        engine.stream(doc_prompt(), max_tokens=3)


def test_every_error_here_is_a_kvboost_error():
    assert issubclass(InvalidInputError, KVBoostError) and issubclass(InvalidInputError, (ValueError, TypeError))
    assert issubclass(GenerationCancelled, KVBoostError)


def test_cli_ask_with_an_empty_prompt_is_an_error(tmp_path, capsys):
    assert main(["ask", "--store", str(tmp_path / "s"), "--device", "cpu", "  "]) == 1
    err = capsys.readouterr().err
    assert "the prompt is empty" in err and len(err.strip().splitlines()) == 1
