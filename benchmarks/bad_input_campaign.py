"""Bad-input campaign (issue 12): try every known bad input against a tiny engine and the CLI.

Each case is classified:

* ``clear``: a :class:`~kvboost_rag.errors.KVBoostError` (or, where documented, the behaviour the
  docs promise: a per-document failure in the warm report, one stop string, the stream's
  ``TimeoutError`` raised inside the prefill); for the CLI, argparse's exit 2 or a non-zero exit
  with a one-line message and no traceback;
* ``raw_exception``: any other exception escaped (a traceback for a user);
* ``silently_accepted``: the call went through as if the input were fine.

Run: ``python benchmarks/bad_input_campaign.py [--quiet] [--json FILE]`` (``--help``; about a minute
on a CPU; tiny random-weight models, no downloads). :func:`run_bad_inputs` returns the figures as a
dict. The LangChain and LlamaIndex cases run when those integrations are installed.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # kvboost_rag_bench (tiny models) when run as a script
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLEAR, RAW, SILENT = "clear", "raw_exception", "silently_accepted"


class Documented(Exception):
    """Raised by a check when the call ended in the documented behaviour (counts as clear)."""


def _engine_case(fn: Callable[[], Any], check: Callable[[Any], bool] = None) -> Tuple[str, str]:
    from kvboost_rag.errors import KVBoostError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
    except Documented as exc:
        return CLEAR, str(exc)
    except KVBoostError as exc:
        return CLEAR, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - what the campaign measures
        return RAW, f"{type(exc).__name__}: {exc}"
    if check is not None and check(result):
        return CLEAR, "documented behaviour"
    return SILENT, f"returned {type(result).__name__}"


def _cli_case(argv: List[str]) -> Tuple[str, str]:
    from kvboost_rag.app.cli import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:  # noqa: BLE001
        return RAW, f"{type(exc).__name__}: {exc}"
    message = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith(("usage:", " "))
               and not line.startswith("store: ")]
    if rc == 0:
        return SILENT, "exit 0"
    if "Traceback" in err.getvalue() or len(message) != 1:
        return RAW, f"exit {rc}, {len(message)} message lines"
    return CLEAR, f"exit {rc}: {message[0][:160]}"


def _cases(engine, tmp: Path, model_dir: Path) -> List[Tuple[str, Callable[[], Tuple[str, str]]]]:
    from kvboost_rag import EngineConfig, KVBoostEngine, SamplingParams, Segment
    from kvboost_rag.app.warm import warm_corpus
    from kvboost_rag.store.disk import DiskStore
    from kvboost_rag.store.tiered import open_store
    from kvboost_rag.testing.models import DOCS

    prompt = ([Segment.text("Context:\n")] + [Segment.document(DOCS[i]) for i in (0, 1)]
              + [Segment.text("\nQuestion: which city?\nAnswer:")])
    gen = lambda **kw: (lambda: engine.generate(kw.pop("p", prompt), **{"max_new_tokens": 2, **kw}))  # noqa: E731
    E = lambda fn, check=None: (lambda: _engine_case(fn, check))  # noqa: E731
    C = lambda *argv: (lambda: _cli_case(list(argv)))  # noqa: E731
    store = str(tmp / "store")
    ask = ["ask", "--store", store, "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "1"]

    def one_stop_string():
        plain = engine.generate(prompt, max_new_tokens=8)
        got = engine.generate(prompt, max_new_tokens=8, stop=plain.text[:1] + "\u2603\u2604")
        return got.text == plain.text and SamplingParams(stop="abc").stop == ("abc",)

    def jsonl(name: str, data: bytes) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    non_str = jsonl("non_str.jsonl", "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in [
        ("ok", "A valid document about rivers and mountains."), ("null", None), ("bool", True),
        ("int", 12345), ("list", ["a"])]).encode())
    bad_utf8 = jsonl("bad_utf8.jsonl", b'{"id": "ok1", "text": "First valid document about stores."}\n'
                     b'{"id": "bad", "text": "caf\xe9"}\n{"id": "ok2", "text": "Second valid document, layers."}\n')
    not_json = jsonl("not_json.jsonl", b'{"id": "ok", "text": "A valid document about vectors."}\n{oops\n[1, 2]\n')
    binary = tmp / "blob.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    not_model = tmp / "not-a-model"
    not_model.mkdir(exist_ok=True)
    (not_model / "README.txt").write_text("not a model")
    empty = tmp / "empty-folder"
    empty.mkdir(exist_ok=True)

    def failures(report, n_failed, n_ok):
        return len(report.failed) == n_failed and report.encoded + report.skipped == n_ok

    def timeout_in_prefill():
        import kvboost_rag.serve.streaming as streaming

        clock = [0.0]
        runs = [0]
        layers = list(engine.model.model.layers)
        originals = [layer.mlp.forward for layer in layers]

        def slow(original):
            def forward(x):
                runs[0] += 1
                clock[0] += 1.0
                return original(x)
            return forward

        saved = getattr(streaming, "_clock", None)
        try:
            streaming._clock = lambda: clock[0]
            for layer, original in zip(layers, originals):
                layer.mlp.forward = slow(original)
            try:
                "".join(engine.stream(prompt, max_new_tokens=4, strategy="full", timeout=2.5))
            except TimeoutError as exc:
                if runs[0] < len(layers):
                    raise Documented(f"TimeoutError after {runs[0]} of {len(layers)} layers: {exc}")
                raise RuntimeError(f"TimeoutError only after the prefill ({runs[0]} layer runs)")
        finally:
            for layer in layers:
                del layer.mlp.forward
            if saved is not None:
                streaming._clock = saved
        return None

    return [
        # engine.warm
        ("warm(str)", E(lambda: engine.warm("one text"))),
        ("warm(bytes)", E(lambda: engine.warm(b"one text"))),
        ("warm(dict)", E(lambda: engine.warm({"text": "one"}))),
        ("warm(None)", E(lambda: engine.warm(None))),
        ("warm(int)", E(lambda: engine.warm(42))),
        ("warm batch_size=0", E(lambda: engine.warm(DOCS, batch_size=0))),
        ("warm batch_size=2.5", E(lambda: engine.warm(DOCS, batch_size=2.5))),
        ("warm doc with lone surrogate", E(lambda: engine.warm(["A fine text about layers.", "bad \ud800 doc"]),
                                          lambda r: failures(r, 1, 1))),
        ("warm list holding None", E(lambda: engine.warm(["A fine text about caches.", None]),
                                     lambda r: failures(r, 1, 1))),
        # prompts and segments
        ("prompt bytes", E(gen(p=b"What is it?"))),
        ("prompt dict", E(gen(p={"text": "hi"}))),
        ("prompt int", E(gen(p=12345))),
        ("prompt None", E(gen(p=None))),
        ("prompt list with int part", E(gen(p=["Context", 5]))),
        ("prompt empty str", E(gen(p=""))),
        ("prompt lone surrogate", E(gen(p="abc \ud800 def"))),
        ("stream(bytes) at call time", E(lambda: engine.stream(b"x"))),
        ("Segment unknown kind", E(lambda: Segment("table", "x"))),
        ("Segment non-str text", E(lambda: Segment("document", 123))),
        ("Segment.document lone surrogate", E(lambda: Segment.document("doc \udfff"))),
        ("blank document segment", E(gen(p=[Segment.document("   "), "Q?"]))),
        ("prompt beyond the context window", E(gen(p="word " * 3000))),
        # sampling
        ("temperature=inf", E(gen(temperature=math.inf))),
        ("temperature=nan", E(gen(temperature=math.nan))),
        ("temperature=-1", E(gen(temperature=-1.0))),
        ("temperature=True", E(gen(temperature=True))),
        ("top_p=0", E(gen(top_p=0.0))),
        ("top_p=nan", E(gen(top_p=math.nan))),
        ("top_p=1.5", E(gen(top_p=1.5))),
        ("top_k=2.5", E(gen(top_k=2.5))),
        ("top_k=-1", E(gen(top_k=-1))),
        ("max_new_tokens=2.5", E(gen(max_new_tokens=2.5))),
        ("max_new_tokens=0", E(gen(max_new_tokens=0))),
        ("max_new_tokens='5'", E(gen(max_new_tokens="5"))),
        ("seed='abc'", E(gen(temperature=0.7, seed="abc"))),
        ("seed=1.5", E(gen(temperature=0.7, seed=1.5))),
        ("stop='abc' is one stop string", E(one_stop_string, bool)),
        ("stop=[1, 2]", E(gen(stop=[1, 2]))),
        ("stop=b'x'", E(gen(stop=b"x"))),
        # strategy / ratio / timeout / kwargs
        ("recompute_ratio=True (reuse)", E(gen(strategy="reuse", recompute_ratio=True))),
        ("recompute_ratio=True (full)", E(gen(strategy="full", recompute_ratio=True))),
        ("recompute_ratio=nan", E(gen(recompute_ratio=math.nan))),
        ("recompute_ratio=1.5", E(gen(recompute_ratio=1.5))),
        ("recompute_ratio='0.5'", E(gen(recompute_ratio="0.5"))),
        ("strategy='fast'", E(gen(strategy="fast"))),
        ("strategy=3", E(gen(strategy=3))),
        ("timeout=0", E(lambda: engine.stream(prompt, timeout=0))),
        ("timeout=-1", E(lambda: engine.stream(prompt, timeout=-1))),
        ("timeout=nan", E(lambda: engine.stream(prompt, timeout=math.nan))),
        ("timeout bounds the prefill", E(timeout_in_prefill)),
        ("stream unknown kwarg", E(lambda: engine.stream(prompt, max_tokens=3))),
        ("prefill max_new_tokens=1.5", E(lambda: engine.prefill(prompt, max_new_tokens=1.5))),
        # chat messages
        ("chat message without role", E(lambda: engine.chat_segments([{"content": "hi"}]))),
        ("chat unknown role", E(lambda: engine.chat_segments([{"role": "wizard", "content": "hi"}]))),
        ("chat content int", E(lambda: engine.chat_segments([{"role": "user", "content": 42}]))),
        ("chat content part float", E(lambda: engine.chat_segments([{"role": "user", "content": ["a", 1.5]}]))),
        ("chat messages as str", E(lambda: engine.chat_segments("user: hi"))),
        ("chat message not a dict", E(lambda: engine.chat_segments([["user", "hi"]]))),
        # configuration
        ("EngineConfig prefix_cache_bytes='x'", E(lambda: EngineConfig(prefix_cache_bytes="x"))),
        ("EngineConfig recompute_ratio=nan", E(lambda: EngineConfig.from_kwargs(recompute_ratio=math.nan))),
        ("EngineConfig preamble=5", E(lambda: EngineConfig(preamble=5))),
        # corpus files
        ("jsonl text null/true/int/list", E(lambda: warm_corpus(non_str, engine, progress=False),
                                            lambda r: failures(r, 4, 1))),
        ("jsonl invalid UTF-8 line", E(lambda: warm_corpus(bad_utf8, engine, progress=False),
                                       lambda r: failures(r, 1, 2))),
        ("jsonl invalid JSON / non-object lines", E(lambda: warm_corpus(not_json, engine, progress=False),
                                                    lambda r: failures(r, 2, 1))),
        ("warm_corpus missing path", E(lambda: warm_corpus(tmp / "nope.jsonl", engine, progress=False))),
        ("warm_corpus batch_size=0", E(lambda: warm_corpus(DOCS, engine, batch_size=0, progress=False))),
        # CLI
        ("cli warm --max-bytes -1", C("warm", str(non_str), "--store", store, "--max-bytes", "-1")),
        ("cli warm --batch-size 0", C("warm", str(non_str), "--store", store, "--batch-size", "0")),
        ("cli ask --temperature nan", C(*ask, "--temperature", "nan", "hi")),
        ("cli ask --recompute-ratio 2", C(*ask, "--recompute-ratio", "2", "hi")),
        ("cli ask --max-new-tokens 2.5", C("ask", "--max-new-tokens", "2.5", "hi")),
        ("cli ask --doc binary file", C(*ask, "--doc", str(binary), "hi")),
        ("cli ask --doc missing file", C(*ask, "--doc", str(tmp / "missing.txt"), "hi")),
        ("cli ask --doc a folder", C(*ask, "--doc", str(tmp), "hi")),
        ("cli --model folder that is not a model", C("ask", "--store", store, "--model", str(not_model), "hi")),
        ("cli --model missing .gguf", C("ask", "--store", store, "--model", str(tmp / "m.gguf"), "hi")),
        ("cli warm empty folder", C("warm", str(empty), "--store", store, "--model", str(model_dir),
                                    "--device", "cpu", "--no-progress")),
        ("cli warm missing corpus", C("warm", str(tmp / "nope"), "--store", store)),
        ("cli ask empty prompt", C(*ask, "")),
        ("cli ask lone surrogate prompt", C(*ask, "hi \udcff")),
        # issue "a store and engine that never give a wrong answer": refused before anything is written
        ("stop=['']", E(gen(stop=[""]))),
        ("stop=['Answer', '']", E(gen(stop=["Answer", ""]))),
        ("strategy=''", E(gen(strategy=""))),
        ("prompt only whitespace", E(gen(p="  \n\t "))),
        ("prompt of whitespace segments", E(gen(p=[" ", Segment.text("\n")]))),
        ("verify([])", E(lambda: engine.verify([]))),
        ("verify('abc')", E(lambda: engine.verify("abc"))),
        ("chat user content None", E(lambda: engine.chat_segments([{"role": "user", "content": None}]))),
        ("chat system message without content", E(lambda: engine.chat_segments([{"role": "system"}]))),
        ("from_pretrained(store=123)", E(lambda: KVBoostEngine.from_pretrained(str(model_dir), store=123))),
        ("from_pretrained(device='tpu')", E(lambda: KVBoostEngine.from_pretrained(str(model_dir), device="tpu"))),
        ("from_pretrained(dtype='int8')", E(lambda: KVBoostEngine.from_pretrained(str(model_dir), dtype="int8"))),
        ("from_pretrained(store='')", E(lambda: KVBoostEngine.from_pretrained(str(model_dir), store=""))),
        ("KVBoostEngine(..., bogus=1)", E(lambda: KVBoostEngine(engine.model, engine.tokenizer, bogus=1))),
        ("open_store(max_bytes=-1)", E(lambda: open_store(tmp / "s-neg", max_bytes=-1))),
        ("open_store(max_bytes='1GB')", E(lambda: open_store(tmp / "s-str", max_bytes="1GB"))),
        ("open_store(memory_bytes=-1)", E(lambda: open_store(tmp / "s-mem", memory_bytes=-1))),
        ("DiskStore(123)", E(lambda: DiskStore(123))),
        ("DiskStore('')", E(lambda: DiskStore(""))),
        ("cli inspect --store ''", C("inspect", "--store", "")),
        ("cli ask --store ''", C("ask", "--store", "", "--model", str(model_dir), "hi")),
        *_framework_cases(engine, E),
    ]


def _framework_cases(engine, E) -> List[Tuple[str, Callable[[], Tuple[str, str]]]]:
    """The LangChain and LlamaIndex integrations' bad inputs (skipped where one is not installed)."""
    cases: List[Tuple[str, Callable[[], Tuple[str, str]]]] = []
    try:
        from langchain_kvboost import ChatKVBoost, KVBoostLLM
    except ImportError:
        pass
    else:
        chat, llm = ChatKVBoost(engine=engine, max_tokens=2), KVBoostLLM(engine=engine, max_tokens=2)
        cases += [
            ("langchain ChatKVBoost.invoke(stop=[''])", E(lambda: chat.invoke("hi", stop=[""]))),
            ("langchain KVBoostLLM.invoke(stop=[''])", E(lambda: llm.invoke("hi", stop=[""]))),
            ("langchain ChatKVBoost(max_retries=-1)", E(lambda: ChatKVBoost(engine=engine, max_retries=-1))),
            ("langchain KVBoostLLM(max_retries=-1)", E(lambda: KVBoostLLM(engine=engine, max_retries=-1))),
            ("langchain bind_tools([5])", E(lambda: chat.bind_tools([5]))),
            ("langchain bind_tools('garbage')", E(lambda: chat.bind_tools("garbage"))),
            ("langchain invoke(tool_choice='required') without tools",
             E(lambda: chat.invoke("hi", tool_choice="required"))),
            ("langchain batch max_concurrency=0", E(lambda: chat.batch(["a", "b"], config={"max_concurrency": 0}))),
            ("langchain KVBoostLLM.batch max_concurrency=0",
             E(lambda: llm.batch(["a", "b"], config={"max_concurrency": 0}))),
        ]
    try:
        from llama_index.llms.kvboost import KVBoostLLM as LlamaIndexLLM
    except ImportError:
        pass
    else:
        li = LlamaIndexLLM(engine=engine, max_new_tokens=2)
        cases += [
            ("llama-index complete(stop=[''])", E(lambda: li.complete("hi", stop=[""]))),
            ("llama-index stream_complete(stop=[''])", E(lambda: list(li.stream_complete("hi", stop=[""])))),
        ]
    return cases


def run_bad_inputs(verbose: bool = False) -> Dict[str, Any]:
    """Try every case; ``{"tried", "clear_error", "raw_exception": [names], "silently_accepted": [names]}``
    (plus ``"details"``: name -> (outcome, what happened))."""
    import torch

    from kvboost_rag.testing.models import DOCS, tiny_engine, tiny_model, tiny_tokenizer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="kvb-bad-input-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "tiny-model"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
            engine = tiny_engine("llama")
            engine.warm(DOCS)
        details: Dict[str, Tuple[str, str]] = {}
        for name, case in _cases(engine, tmp, model_dir):
            details[name] = case()
            if verbose:
                print(f"{details[name][0]:18s} {name:42s} {details[name][1][:110]}", flush=True)
    return {
        "tried": len(details),
        "clear_error": sum(outcome == CLEAR for outcome, _ in details.values()),
        "raw_exception": [n for n, (outcome, _) in details.items() if outcome == RAW],
        "silently_accepted": [n for n, (outcome, _) in details.items() if outcome == SILENT],
        "details": details,
    }


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="bad_input_campaign.py",
        description="Try every known bad input against a tiny random-weight engine, the CLI and the LangChain / "
                    "LlamaIndex integrations (those installed); each must be a clear KVBoostError (or the "
                    "documented behaviour), never a raw exception or a silent acceptance. About a minute on a "
                    "CPU, no downloads.",
        epilog="exit status: 0 when every case is a clear error, 1 otherwise")
    ap.add_argument("--quiet", action="store_true", help="no line per case, only the tally")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the figures (and each case) to FILE")
    args = ap.parse_args(argv)
    figures = run_bad_inputs(verbose=not args.quiet)
    print()
    print(f"tried              {figures['tried']}")
    print(f"clear error        {figures['clear_error']}")
    print(f"raw exception      {len(figures['raw_exception'])}: {', '.join(figures['raw_exception']) or '-'}")
    print(f"silently accepted  {len(figures['silently_accepted'])}: {', '.join(figures['silently_accepted']) or '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0 if not figures["raw_exception"] and not figures["silently_accepted"] else 1


if __name__ == "__main__":
    sys.exit(main())
