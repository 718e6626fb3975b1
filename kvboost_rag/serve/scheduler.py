"""Continuous batching: concurrent requests decode together, one model forward per step.

Without it, requests from several threads serialize under the engine's lock, each decode step a
batch of one. The :class:`Scheduler` (one per engine, created on first use) runs rounds instead:

1. take one waiting request (at most ``EngineConfig.max_waiting`` wait; beyond, a
   :class:`~kvboost_rag.errors.SchedulerFullError`), run its prefill and sample its first token;
   one prefill per round, so waiting prompts never starve the answers being decoded, nor the reverse;
2. move the prompt's KV into a row of the batch buffer (:class:`~kvboost_rag.kv.batch.BatchKV`),
   while the buffers stay within ``EngineConfig.batch_kv_bytes`` (else it waits for a request to
   leave; a request alone always runs);
3. one forward for every active row (:func:`~.ragged.batched_step`: each row's logits are those of
   its request alone), each row's logits handed to its request's own
   :func:`~kvboost_rag.decode.loop.decode` generator (penalties, constraint, sampling, stop strings
   and cancellation exactly as alone); a finished request leaves at once.

A lone request is driven by its caller's own thread between its yields, as fast as
``batching=False``; the moment another arrives a worker thread takes over all of them (it never
waits for a consumer that stopped reading) and exits when idle. Worker threads are stopped and
joined at interpreter exit.

The scheduler sees :class:`~.request.GenerationRequest` objects and the engine's
:class:`~.request.Runner` (prefill function, result builder, lock), never the engine itself.
Design: docs/architecture.md.
"""
from __future__ import annotations

import atexit
import collections
import queue
import threading
import time
import weakref
from typing import Any, Iterator, Optional

import torch

from kvboost_rag.config import EngineConfig
from kvboost_rag.decode.loop import GenerationResult, decode
from kvboost_rag.errors import GenerationCancelled, SchedulerFullError
from kvboost_rag.kv.batch import BatchKV
from kvboost_rag.serve.ragged import NO_CACHE, RowModel, register_ragged, batched_step
from kvboost_rag.serve.request import GenerationRequest, Runner

__all__ = ["Scheduler"]

_IDLE_EXIT_S = 2.0       # the worker thread exits after this long with nothing to do
_POLL_S = 0.05           # how often a waiting consumer re-checks its own should_stop


class _Job:
    """The scheduler's handle on one request: the events it hands the consumer, the request's
    decode generator and the stub that feeds it its row's logits."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False               # the consumer stopped reading
        self.gen: Optional[Iterator] = None
        self.model = RowModel()
        self.token: Optional[int] = None     # the last sampled token: the next step's input

    def stopped(self) -> bool:
        return self.abandoned or self.request.stopped()

    def take(self, wait: bool) -> Optional[tuple[str, Optional[GenerationResult]]]:
        """The next event as a stream item, ``(delta, None)`` or ``("", result)``; None if there is
        none yet (``wait``: for up to ``_POLL_S``). An error is raised here, in the consumer's thread."""
        try:
            kind, item = self.events.get(timeout=_POLL_S) if wait else self.events.get_nowait()
        except queue.Empty:
            return None
        if kind == "error":
            raise item
        return (item, None) if kind == "delta" else ("", item)


_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _shutdown_schedulers() -> None:
    """At interpreter exit, stop every worker thread and wait for it: a daemon thread that has run
    torch and is still alive while the interpreter finalizes can abort the process ("terminate
    called without an active exception", exit code 134), e.g. right after ``generate_batch``."""
    for sched in list(_LIVE):
        sched.close()


class Scheduler:
    """Admits requests from any thread and decodes them together in one worker thread."""

    def __init__(self, runner: Runner, config: EngineConfig) -> None:
        self.runner = runner
        self.max_batch, self.max_waiting, self.kv_budget = config.max_batch, config.max_waiting, config.batch_kv_bytes
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._ready: collections.deque[_Job] = collections.deque()  # prefilled, waiting for memory / a slot
        self._active: list[_Job] = []      # row b of self.kv is self._active[b]
        self.ragged = register_ragged()  # SDPA rows attend their own keys only (serve.ragged)
        self.kv = self._new_kv()
        self._worker: Optional[threading.Thread] = None
        self._inline: Optional[_Job] = None   # a lone request whose caller's thread drives the loop
        self._drive = threading.Lock()            # held by whichever thread runs a scheduler round
        self._closing = False
        self._token_bytes = 0
        self.stats = collections.Counter()
        _LIVE.add(self)

    def _new_kv(self) -> BatchKV:
        # the ragged path never reads a row past its length: new buffers need no clearing
        return BatchKV(zero_fill=not (self.ragged and self.runner.model.config._attn_implementation == "sdpa"))

    # ------------------------------------------------------------------ caller side
    def _has_work(self) -> bool:
        return bool(self._waiting or self._ready or self._active)

    def submit(self, job: _Job, inline: bool = False) -> bool:
        """Queue a job. With ``inline``, when the scheduler is idle, the caller's thread is to drive
        it (returns True): a lone request runs without a thread hand-off per token. Any other
        submission ends that: the worker thread takes over the whole batch."""
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                self.stats["refused"] += 1
                raise SchedulerFullError(
                    f"{len(self._waiting)} requests are already waiting for this engine (max_waiting="
                    f"{self.max_waiting}); retry later, or raise max_waiting / max_batch in EngineConfig")
            # an idle worker (waiting to exit) leaves a lone request to its caller, and exits
            drive_here = inline and self._inline is None and not self._has_work()
            self._waiting.append(job)
            if drive_here:
                self._inline = job
                return True
            self._inline = None  # a second request: the worker drives from now on
            self._closing = False
            self._start_worker()
            self._cv.notify_all()
            return False

    def run(self, request: GenerationRequest) -> Iterator[tuple[str, Optional[GenerationResult]]]:
        """The same events as :meth:`Runner.events <kvboost_rag.serve.request.Runner.events>`
        (text deltas, then ``("", result)``). A lone request is driven by the caller's own thread
        (between its yields) until another request arrives; otherwise, or from then on, the worker
        thread produces them and this thread only waits on its queue."""
        request.start()
        job = _Job(request)
        inline = self.submit(job, inline=True)
        try:
            if inline:
                try:
                    while self._inline is job:
                        self._iterate()
                        while (event := job.take(wait=False)) is not None:
                            yield event
                            if event[1] is not None:
                                return
                finally:
                    self._end_inline(job)
            while True:
                event = job.take(wait=True)
                if event is None:
                    if job.stopped():
                        raise GenerationCancelled("stopped while waiting for the batch")
                    continue
                yield event
                if event[1] is not None:
                    return
        finally:
            job.abandoned = True  # the worker drops it at its next step (or before its prefill)

    def _end_inline(self, job: _Job) -> None:
        """The inline driver stops (its answer is done, failed or dropped): what is left goes to
        the worker thread."""
        with self._cv:
            if self._inline is job:
                self._inline = None
            if self._has_work():
                self._start_worker()
            self._cv.notify_all()

    def _start_worker(self) -> None:
        """Start the worker thread unless it runs (call under ``self._cv``)."""
        if not (self._worker is not None and self._worker.is_alive()):
            self._worker = threading.Thread(target=self._loop, name="kvboost-scheduler", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._closing or not self._has_work() or self._inline is not None:
                    if self._closing or (not self._cv.wait(_IDLE_EXIT_S)
                                         and (not self._has_work() or self._inline is not None)):
                        if self._worker is threading.current_thread():
                            self._worker = None  # idle (or a caller drives its lone request): exit
                        return
            self._iterate()

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Stop the worker thread after its current round and wait up to ``timeout`` s for it
        (called at interpreter exit; a later request starts a new worker)."""
        with self._cv:
            self._closing = True
            worker = self._worker
            self._cv.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _iterate(self) -> None:
        """One round: at most one prefill (waiting prompts never starve the answers being decoded,
        nor the reverse), the joins it allows, one decode step for every active request."""
        with self._drive:
            with self._cv:
                nxt = None
                if not self._ready and self._waiting and len(self._active) < self.max_batch:
                    nxt = self._waiting.popleft()
            try:
                t0 = time.perf_counter()
                if nxt is not None:
                    self._prefill(nxt)
                t1 = time.perf_counter()
                self._admit_ready()
                t2 = time.perf_counter()
                if self._active:
                    self._step()
                t3 = time.perf_counter()
                self.stats["prefill_s"] += t1 - t0   # prefills/blends and first tokens
                self.stats["join_s"] += t2 - t1      # moving prompts' KV into the batch
                self.stats["step_s"] += t3 - t2      # decode steps (forward + each row's sampling)
            except BaseException as exc:  # noqa: BLE001 - handed to every request concerned
                self._fail_all(exc)

    def _deliver_error(self, job: _Job, exc: BaseException) -> None:
        job.events.put(("error", exc))

    def _fail_all(self, exc: BaseException) -> None:
        for job in list(self._active) + list(self._ready):
            self._deliver_error(job, exc)
        self._active.clear()
        self._ready.clear()
        self.kv = self._new_kv()

    def _prefill(self, job: _Job) -> None:
        if job.stopped():
            self._deliver_error(job, GenerationCancelled("stopped before the prefill"))
            return
        request, runner = job.request, self.runner
        try:
            request.queue_s = time.perf_counter() - request.started
            pre = request.prefilled = runner.prefill(request)
            job.gen = decode(job.model, runner.tokenizer, NO_CACHE, pre.logits, len(pre.input_ids), request.params,
                             runner.eos_ids, should_stop=request.should_stop, prompt_ids=pre.input_ids)
            request.ttft_s = time.perf_counter() - request.started
            if self._advance(job):
                return
        except BaseException as exc:  # noqa: BLE001
            self._deliver_error(job, exc)
            return
        self._ready.append(job)

    def _slot_limit(self, job: _Job) -> int:
        """How many rows the buffers may have once ``job`` joins (0: it must wait)."""
        limit = self.max_batch
        if self.kv_budget and self._token_bytes:
            capacity = self.kv.capacity_for(job.request.kv_tokens)
            limit = min(limit, self.kv_budget // (capacity * self._token_bytes))
        if self.kv.size >= limit and self._active:
            return 0
        return max(limit, self.kv.size + 1)  # a request alone always runs

    def _admit_ready(self) -> None:
        while self._ready and len(self._active) < self.max_batch:
            job = self._ready[0]
            if job.stopped():
                self._ready.popleft()
                self._deliver_error(job, GenerationCancelled("stopped before joining the batch"))
                continue
            pre = job.request.prefilled
            layers = pre.cache.layers
            if not self._token_bytes:
                self._token_bytes = sum(l.keys[0, :, :1].numel() * l.keys.element_size()
                                        + l.values[0, :, :1].numel() * l.values.element_size() for l in layers)
            limit = self._slot_limit(job)
            if not limit:
                self.stats["waited_for_memory"] += 1
                return  # waits until a request leaves
            self._ready.popleft()
            with self._cv:  # rows for every request in sight, so a burst does not regrow the buffers
                demand = len(self._active) + 1 + len(self._ready) + len(self._waiting)
            self.kv.add([l.keys for l in layers], [l.values for l in layers], job.request.kv_tokens, limit,
                        want_slots=demand)
            pre.cache = None  # the batch buffer holds it now
            self._active.append(job)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self._active))

    def _leave(self, job: _Job) -> None:
        row = self._active.index(job)
        moved = self.kv.remove(row)
        if moved is not None:
            self._active[row] = self._active[moved]
        self._active.pop()

    def _step(self) -> None:
        for job in [r for r in self._active if r.stopped()]:
            self._leave(job)
            self._deliver_error(job, GenerationCancelled("stopped"))
        if not self._active:
            return
        model = self.runner.model
        device = model.get_input_embeddings().weight.device
        t0 = time.perf_counter()
        with self.runner.lock, torch.inference_mode():
            ids = torch.tensor([[j.token] for j in self._active], device=device)
            out = batched_step(model, self.kv, ids, ragged=self.ragged)
        self.stats["forward_s"] += time.perf_counter() - t0
        logits = out.logits[:, -1]
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(self._active)
        for b, job in enumerate(list(self._active)):
            job.model.logits = logits[b]
        for job in list(self._active):
            try:
                done = self._advance(job)
            except BaseException as exc:  # noqa: BLE001 - this request's own failure (cancel, grammar)
                self._leave(job)
                self._deliver_error(job, exc)
                continue
            if done:
                self._leave(job)

    def _advance(self, job: _Job) -> bool:
        """Run the request's decode generator one token; True once it finished."""
        token, delta, reason = next(job.gen)
        request = job.request
        request.record(token, delta, reason)
        if delta:
            job.events.put(("delta", delta))
        job.token = token
        if reason is None:
            return False
        prefill_s = request.prefilled.ttft_s
        result = request.finish(self.runner.result(request))
        result.extra.update(queue_s=request.queue_s, prefill_s=prefill_s, batched=True)
        job.events.put(("done", result))
        return True

    def snapshot(self) -> dict[str, Any]:
        """Counters (requests, steps, row-steps, the worker's seconds in prefills, joins, steps and
        the forwards within them) and the current state (waiting, active, reserved KV bytes)."""
        with self._cv:
            return {**self.stats, "waiting": len(self._waiting), "ready": len(self._ready),
                    "active": len(self._active),
                    "reserved_kv_bytes": self.kv.slots * self.kv.capacity * self._token_bytes}


