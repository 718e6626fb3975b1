"""Continuous batching across requests: batched answers equal the same requests run
alone, token for token; per-request options, cancellation, queue bound and memory budget.
Tiny float32 random-weight models."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kvboost_rag import InvalidConfigError, Segment
from kvboost_rag.errors import ContextWindowError, SchedulerFullError
from kvboost_rag.kv.hf_compat import cache_kwargs
from kvboost_rag.kv.decode_cache import with_room
from kvboost_rag.kv.batch import BatchKV
from kvboost_rag.serve.ragged import RAGGED_ATTENTION, _ragged_attention, batched_step

from kvboost_rag.testing.models import DOCS, tiny_engine


def _prompts(n: int = 5) -> list:
    """Prompts of different lengths (1..4 documents, questions of growing length)."""
    out = []
    for i in range(n):
        docs = [Segment("document", d) for d in (DOCS * 2)[i % 4: i % 4 + 1 + i % 4]]
        out.append([Segment("text", "Documents:"), *docs, Segment("text", " Question: what is it ?" * (i + 1))])
    return out


def _pair(kind: str = "llama", **kwargs):
    on = tiny_engine(kind, write_behind=False, batching=True, **kwargs)
    off = tiny_engine(kind, write_behind=False, batching=False, **kwargs)
    on.warm(DOCS)
    off.warm(DOCS)
    return on, off


@pytest.fixture(scope="module")
def engines():
    return _pair()


def _threads(engine, prompts, kwargs_for):
    results, errors = [None] * len(prompts), []

    def go(i):
        try:
            results[i] = engine.generate(prompts[i], **kwargs_for(i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batched_logits_match_unbatched(kind):
    """Teacher-forced: the padded batch step gives each row the logits of its request alone."""
    engine, _ = _pair(kind)
    prompts, steps = _prompts(3), 6
    tokens = [[5 + i + j for j in range(steps)] for i in range(3)]
    with torch.inference_mode():
        ref = []
        for p, t in zip(prompts, tokens):
            pre = engine.prefill(p)
            n = len(pre.input_ids)
            out = engine.model(input_ids=torch.tensor([t]), position_ids=torch.arange(n, n + steps)[None],
                               **cache_kwargs(pre.cache), use_cache=True)
            ref.append(out.logits[0])
        kv = BatchKV()
        lengths = []
        for p in prompts:
            pre = engine.prefill(p)
            layers = pre.cache.layers
            lengths.append(len(pre.input_ids))
            kv.add([l.keys for l in layers], [l.values for l in layers], len(pre.input_ids) + steps, 8)
        assert len(set(lengths)) == 3  # ragged
        for s in range(steps):
            pos, mask = kv.step_inputs(torch.float32, "cpu")
            out = engine.model(input_ids=torch.tensor([[t[s]] for t in tokens]), position_ids=pos,
                               attention_mask=mask, **cache_kwargs(kv), use_cache=True)
            kv.advance()
            for b in range(3):
                torch.testing.assert_close(out.logits[b, -1], ref[b][s], atol=1e-4, rtol=1e-4)


def test_greedy_batched_equals_alone(engines):
    on, off = engines
    prompts = _prompts(5)
    alone = [off.generate(p, max_new_tokens=20 + 3 * i) for i, p in enumerate(prompts)]
    assert len({r.prompt_tokens for r in alone}) == 5
    threaded = _threads(on, prompts, lambda i: {"max_new_tokens": 20 + 3 * i})
    for a, b in zip(alone, threaded):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        assert (b.reused_tokens, b.recomputed_tokens, b.fresh_tokens) == (a.reused_tokens, a.recomputed_tokens,
                                                                         a.fresh_tokens)
        assert b.extra["batched"] is True and b.ttft_s > 0
    batch = on.generate_batch(prompts, max_new_tokens=24)
    for a, b in zip(off.generate_batch(prompts, max_new_tokens=24), batch):
        assert b.token_ids == a.token_ids
    assert on.scheduler.snapshot()["max_batch_seen"] >= 2


def test_each_request_keeps_its_own_options(engines):
    on, off = engines
    prompts = _prompts(4)
    options = [
        {"max_new_tokens": 30, "repetition_penalty": 1.5},
        {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 3},
        {"max_new_tokens": 25, "no_repeat_ngram_size": 2},
        {"max_new_tokens": 30},
    ]
    alone = [off.generate(p, **o) for p, o in zip(prompts, options)]
    stop = alone[3].text[len(alone[3].text) // 2:][:3]
    options[3]["stop"] = [stop]
    alone[3] = off.generate(prompts[3], **options[3])
    batched = _threads(on, prompts, lambda i: options[i])
    for a, b in zip(alone, batched):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    assert batched[3].finish_reason == "stop"


def test_streams_deltas_and_cancel_one_without_disturbing_others(engines):
    on, off = engines
    prompts = _prompts(3)
    ref = off.generate(prompts[0], max_new_tokens=40)
    stream = on.stream(prompts[1], max_new_tokens=200)
    others = {}

    def run_other():
        others["r"] = on.generate(prompts[0], max_new_tokens=40)

    t = threading.Thread(target=run_other)
    t.start()
    got = []
    for delta in stream:
        got.append(delta)
        if len(got) == 3:
            stream.cancel()
    t.join(60)
    assert others["r"].token_ids == ref.token_ids
    assert stream.result is None  # cancelled: no result, a quiet end
    deltas = list(on.stream(prompts[2], max_new_tokens=16))
    assert "".join(deltas) == off.generate(prompts[2], max_new_tokens=16).text


def test_timeout_under_batching(engines):
    on, _ = engines
    with pytest.raises(TimeoutError):  # 500 fits the window: the timeout is the only possible error
        on.generate(_prompts(1)[0], max_new_tokens=500, timeout=1e-4)


def test_a_failing_request_fails_alone(engines):
    on, off = engines
    prompts = _prompts(2)
    long = " ".join(["word"] * 2000)
    results, errors = {}, {}

    def go(name, prompt, n):
        try:
            results[name] = on.generate(prompt, max_new_tokens=n)
        except Exception as exc:
            errors[name] = exc

    ts = [threading.Thread(target=go, args=("ok", prompts[0], 30)), threading.Thread(target=go, args=("bad", long, 5))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert isinstance(errors["bad"], ContextWindowError)
    assert results["ok"].token_ids == off.generate(prompts[0], max_new_tokens=30).token_ids


def test_waiting_queue_is_bounded():
    engine = tiny_engine(write_behind=False, batching=True, max_waiting=1)
    engine.warm(DOCS)
    prompts = _prompts(3)
    errors, results = [], []

    def go(p):
        try:
            results.append(engine.generate(p, max_new_tokens=5))
        except SchedulerFullError as exc:
            errors.append(exc)

    with engine._lock:  # the worker stalls in the first prefill
        first = threading.Thread(target=go, args=(prompts[0],))
        first.start()
        deadline = time.time() + 10
        sched = engine.scheduler
        while time.time() < deadline and (sched._inline is None or sched.snapshot()["waiting"]):
            time.sleep(0.01)
        # a lone request: its caller's thread drives it (no worker thread), stalled in the prefill
        assert sched._inline is not None and sched._worker is None and not sched.snapshot()["waiting"]
        second = threading.Thread(target=go, args=(prompts[1],))
        second.start()
        while not engine.scheduler.snapshot()["waiting"] and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(SchedulerFullError, match="max_waiting"):
            engine.generate(prompts[2], max_new_tokens=5)
    first.join(60)
    second.join(60)
    assert len(results) == 2 and not errors


def test_memory_budget_makes_requests_wait():
    on, off = _pair(batch_kv_bytes=1)  # any second request exceeds it: one at a time, still correct
    prompts = _prompts(4)
    batched = on.generate_batch(prompts, max_new_tokens=15)
    for p, b in zip(prompts, batched):
        assert b.token_ids == off.generate(p, max_new_tokens=15).token_ids
    snap = on.scheduler.snapshot()
    assert snap["max_batch_seen"] == 1 and snap["waited_for_memory"] > 0


def test_max_batch_caps_the_batch():
    on, off = _pair(max_batch=2)
    prompts = _prompts(5)
    for p, b in zip(prompts, on.generate_batch(prompts, max_new_tokens=12)):
        assert b.token_ids == off.generate(p, max_new_tokens=12).token_ids
    assert on.scheduler.snapshot()["max_batch_seen"] <= 2


def test_config_is_checked():
    for bad in ({"batching": "yes"}, {"max_batch": 0}, {"max_waiting": 0}, {"batch_kv_bytes": -1}):
        with pytest.raises(InvalidConfigError):
            tiny_engine(**bad)
    engine = tiny_engine(write_behind=False)
    with pytest.raises(Exception, match="list of prompts"):
        engine.generate_batch("one prompt")


# ------------------------------------------------------------------ the ragged fast path
def _alone_steps(engine, prompt, tokens):
    """Teacher-forced logits of ``tokens`` fed one at a time, the way a request alone decodes
    (generate.decode: the prefill's cache moved into in-place buffers, one forward per token)."""
    pre = engine.prefill(prompt)
    cache = with_room(pre.cache, len(tokens))
    n, rows = len(pre.input_ids), []
    for s, t in enumerate(tokens):
        out = engine.model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[n + s]]),
                           **cache_kwargs(cache), use_cache=True)
        rows.append(out.logits[0, -1])
    return rows


def _join(kv, engine, prompt, room, max_slots=8):
    pre = engine.prefill(prompt)
    layers = pre.cache.layers
    return kv.add([l.keys for l in layers], [l.values for l in layers], len(pre.input_ids) + room, max_slots)


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("qwen2", {}), ("llama", {"num_key_value_heads": 4})],
                         ids=["llama-gqa", "qwen2-gqa", "llama-mha"])
def test_ragged_step_is_bitwise_the_request_alone(kind, overrides):
    """Continuous batching through batched_step: rows join (buffer grows, rows reallocated) and leave
    (the last row moves into the hole) while others decode; every row's logits at every step are
    those of its request decoding alone. (Attention is bitwise the same, see the next test; float32
    matmuls of 2..5 rows may round differently from one row in MKL, hence a 1e-5 tolerance here;
    benchmarks/concurrency_bench.py checks a real model's answers.)"""
    import warnings

    from kvboost_rag import KVBoostEngine
    from kvboost_rag.testing.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(kind, vocab_size=len(tok), **overrides)
    engine = KVBoostEngine(model, tok, write_behind=False)
    engine.warm(DOCS)
    prompts, steps = _prompts(5), 8
    tokens = [[7 + 3 * i + j for j in range(steps)] for i in range(5)]
    with torch.inference_mode():
        alone = [_alone_steps(engine, p, t) for p, t in zip(prompts, tokens)]
        kv, live, done = BatchKV(), [], {}  # live[b] = [request index, steps taken]
        schedule = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> requests joining before it
        for step in range(steps + 4):
            for i in schedule.get(step, []):
                assert _join(kv, engine, prompts[i], steps) == len(live)
                live.append([i, 0])
            if not live:
                break
            ids = torch.tensor([[tokens[i][s]] for i, s in live])
            out = batched_step(engine.model, kv, ids)
            assert engine.model.config._attn_implementation == "sdpa"  # switched back
            for b, (i, s) in enumerate(live):
                torch.testing.assert_close(out.logits[b, -1], alone[i][s], atol=1e-5, rtol=1e-5)
                live[b][1] += 1
                done[i] = s + 1
            for b in reversed(range(len(live))):  # finished rows leave; the last row fills the hole
                if live[b][1] == steps or (step == 4 and live[b][0] == 1):
                    moved = kv.remove(b)
                    if moved is not None:
                        live[b] = live[moved]
                    live.pop()
    assert done == {0: steps, 1: 5, 2: steps, 3: steps, 4: steps}


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_ragged_attention_is_bitwise_the_row_alone(kv_heads):
    """Each row of the ragged path is exactly transformers' SDPA call for that row alone over its
    own keys (what a request decoding alone runs), whatever the padding of the batch holds."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvboost_rag.testing.models import tiny_model

    module = tiny_model("llama", num_key_value_heads=kv_heads).model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    rows = [37, 5, 64, 1]
    q = torch.randn(4, 4, 1, 16, generator=g)
    k, v = (torch.randn(4, kv_heads, 70, 16, generator=g) * 3 for _ in range(2))
    k[1, :, 5:] = float("nan")  # padding garbage is never read
    out, _ = _ragged_attention(module, q, k, v, None, scaling=0.25, kvboost_rows=rows)
    assert out.shape == (4, 1, 4, 16) and out.is_contiguous()
    for b, n in enumerate(rows):
        alone, _ = sdpa_attention_forward(module, q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None,
                                          scaling=0.25)
        assert torch.equal(out[b:b + 1], alone)


def test_incremental_mask_matches_a_rebuilt_one():
    """The mask kept row by row (joins, leaves, steps, growth of rows and capacity) equals the
    mask rebuilt from the lengths."""
    g = torch.Generator().manual_seed(0)
    kv = BatchKV()

    def kv_of(n):
        return [torch.randn(1, 2, n, 4, generator=g)], [torch.randn(1, 2, n, 4, generator=g)]

    ops = [("add", 5, 9), ("step",), ("add", 3, 70), ("step",), ("add", 8, 12), ("add", 2, 5), ("step",),
           ("remove", 1), ("step",), ("add", 100, 140), ("remove", 0), ("step",), ("remove", 2), ("step",)]
    for op in ops:
        if op[0] == "add":
            kv.add(*kv_of(op[1]), op[2], 8)
        elif op[0] == "remove":
            kv.remove(op[1])
        else:
            lengths = list(kv.lengths)
            pos, mask = kv.step_inputs(torch.float32, "cpu")
            assert pos.flatten().tolist() == lengths
            longest = max(lengths) + 1
            ref = torch.zeros(len(lengths), longest)
            for b, n in enumerate(lengths):
                ref[b, n + 1:] = torch.finfo(torch.float32).min
            assert torch.equal(mask[:, 0, 0], ref)
            assert kv.valid_lengths() == [n + 1 for n in lengths]
            kv.update(torch.zeros(len(lengths), 2, 1, 4), torch.zeros(len(lengths), 2, 1, 4), 0)
            kv.advance()


def test_ragged_attention_falls_back_for_other_callers(engines):
    """While a batched step has the ragged implementation switched on, another caller's forward
    (no per-row lengths: a prefill, several queries) runs transformers' SDPA with its usual mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    on, _ = engines
    module = on.model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 5, 8, generator=g) for n in (4, 2, 2))
    mask = torch.zeros(2, 1, 5, 5).masked_fill_(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    ref = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
    assert torch.equal(_ragged_attention(module, q, k, v, mask, scaling=0.3)[0], ref)

    prompt = _prompts(2)[1]
    with torch.inference_mode():
        expected = on.prefill(prompt, strategy="full").logits
        config = on.model.config
        config._attn_implementation = RAGGED_ATTENTION
        try:
            got = on.prefill(prompt, strategy="full").logits
        finally:
            config._attn_implementation = "sdpa"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_eager_models_batch_through_the_padded_mask():
    """Eager attention has no ragged path: the batch attends through the 4D mask, still
    token-for-token the answers alone."""
    import warnings

    from kvboost_rag import KVBoostEngine
    from kvboost_rag.testing.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = KVBoostEngine(tiny_model("llama", attn="eager", vocab_size=len(tok)), tok, write_behind=False,
                           batching=True)
        off = KVBoostEngine(tiny_model("llama", attn="eager", vocab_size=len(tok)), tok, write_behind=False)
    on.warm(DOCS)
    off.warm(DOCS)
    prompts = _prompts(4)
    batched = on.generate_batch(prompts, max_new_tokens=16)
    for p, b in zip(prompts, batched):
        assert b.token_ids == off.generate(p, max_new_tokens=16).token_ids
    assert on.scheduler.snapshot()["max_batch_seen"] >= 2


# ------------------------------------------------------------------ a lone request: the caller drives
def test_a_lone_request_is_driven_by_its_own_thread(engines):
    on, off = engines
    prompt = _prompts(3)[2]
    _wait_idle(on)
    result = on.generate(prompt, max_new_tokens=20)
    assert result.token_ids == off.generate(prompt, max_new_tokens=20).token_ids
    assert result.extra["batched"] is True
    sched = on.scheduler
    assert sched._worker is None and sched._inline is None and not sched.snapshot()["active"]


def _wait_idle(engine, timeout=10.0):
    """Until the previous test's worker thread has exited (it idles 2 s)."""
    sched = engine.scheduler
    deadline = time.time() + timeout
    while time.time() < deadline and (sched._worker is not None or sched.snapshot()["active"]):
        time.sleep(0.05)
    assert sched._worker is None


def test_a_second_request_hands_the_lone_one_to_the_worker(engines):
    """The lone request's stream is not read while another request arrives and completes: the
    worker thread takes over both (nobody waits for the first consumer), and both answers are
    those alone."""
    on, off = engines
    prompts = _prompts(2)
    _wait_idle(on)
    stream = on.stream(prompts[0], max_new_tokens=40)
    it = iter(stream)
    first = [next(it), next(it)]
    assert on.scheduler._inline is not None
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("r", on.generate(prompts[1], max_new_tokens=25)))
    t.start()
    t.join(60)  # completes while the first stream is not being read
    assert not t.is_alive() and other["r"].token_ids == off.generate(prompts[1], max_new_tokens=25).token_ids
    rest = list(it)
    assert "".join(first + rest) == off.generate(prompts[0], max_new_tokens=40).text
    assert stream.result.token_ids == off.generate(prompts[0], max_new_tokens=40).token_ids
    assert on.scheduler.snapshot()["max_batch_seen"] >= 2


def test_dropping_a_lone_stream_leaves_the_scheduler_clean(engines):
    on, off = engines
    prompts = _prompts(2)
    _wait_idle(on)
    stream = on.stream(prompts[0], max_new_tokens=200)
    it = iter(stream)
    next(it)
    stream.cancel()
    assert list(it) == [] and stream.result is None
    deadline = time.time() + 10
    while time.time() < deadline and on.scheduler.snapshot()["active"]:
        time.sleep(0.05)
    assert not on.scheduler.snapshot()["active"]
    assert on.generate(prompts[1], max_new_tokens=12).token_ids == off.generate(prompts[1], max_new_tokens=12).token_ids


def test_worker_is_joined_at_exit():
    """A script that returns right after generate_batch exits cleanly: the idle worker thread is
    stopped and joined at interpreter exit (a daemon thread that ran torch and is alive at
    finalization could abort the process: exit code 134)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from kvboost_rag.testing.models import DOCS, tiny_engine\n"
        "e = tiny_engine(write_behind=False, batching=True); e.warm(DOCS)\n"
        "e.generate_batch(['Documents: ' + DOCS[0] + ' q?', 'Documents: ' + DOCS[1] + ' what?'], max_new_tokens=30)\n"
        "assert e.scheduler._worker is not None and e.scheduler._worker.is_alive()\n" % str(bench))
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]


def test_close_stops_the_worker_and_a_later_request_restarts_it():
    on, off = _pair()
    prompts = _prompts(2)
    on.generate_batch(prompts, max_new_tokens=8)
    worker = on.scheduler._worker
    assert worker is not None
    on.scheduler.close()
    assert not worker.is_alive()
    again = on.generate_batch(prompts, max_new_tokens=8)
    assert [r.token_ids for r in again] == [off.generate(p, max_new_tokens=8).token_ids for p in prompts]
