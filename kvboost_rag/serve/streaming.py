"""Streams of generated text: cancel, deadline, and an async bridge that never blocks a loop.

The engine decodes in the thread that iterates. Frameworks with async APIs (LangChain,
LlamaIndex) iterate in a worker thread and receive deltas through an asyncio queue; this module
is the one place that logic lives, so both integrations stay thin.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from kvboost_rag.errors import GenerationCancelled

_clock = time.monotonic  # the deadline's clock (a test may swap in a fake one)


class TokenStream:
    """Text deltas of one generation, as they are produced.

    - iterate (or ``next()``) for deltas; ``result`` holds the ``GenerationResult`` once done;
    - ``cancel()`` from any thread stops decoding at the next token; ``close()`` / ``with``;
    - ``timeout`` (seconds) raises :class:`TimeoutError` once exceeded, during the prefill too:
      the engine checks :meth:`should_stop` between steps, before every decoder layer and before
      every token (see :func:`kvboost_rag.prefill.forward.layer_checkpoints`);
    - ``async for delta in stream`` decodes in a worker thread (see :func:`aiter_in_thread`).
    """

    def __init__(self, run: Callable[[], Iterator[tuple[str, Any]]], *, timeout: Optional[float] = None,
                 on_token: Optional[Callable[[str], None]] = None) -> None:
        self._run = run
        self.timeout = timeout
        self.on_token = on_token
        self.result = None
        self._cancelled = threading.Event()
        self._iterator: Optional[Iterator[str]] = None
        self._deadline: Optional[float] = None

    def _expired(self) -> bool:
        return self._deadline is not None and _clock() > self._deadline

    def should_stop(self) -> bool:
        """True once cancelled or past the deadline: the engine polls it inside the prefill and
        the decode loop and raises :class:`~kvboost_rag.errors.GenerationCancelled`."""
        return self._cancelled.is_set() or self._expired()

    def _timeout_error(self) -> TimeoutError:
        return TimeoutError(f"generation took longer than timeout={self.timeout}s")

    def _iterate(self) -> Iterator[str]:
        self._deadline = _clock() + self.timeout if self.timeout else None
        events = self._run()
        try:
            for delta, result in events:
                if result is not None:
                    self.result = result
                if delta:
                    if self.on_token is not None:
                        self.on_token(delta)
                    yield delta
                if self._cancelled.is_set():
                    return
                if self._expired():
                    raise self._timeout_error()
        except GenerationCancelled:  # the engine saw should_stop() inside the prefill or decode
            if self._expired():
                raise self._timeout_error() from None
            return  # cancel(): a quiet end
        finally:
            events.close()

    def __iter__(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = self._iterate()
        return self._iterator

    def __next__(self) -> str:
        return next(iter(self))

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.cancel()
        if self._iterator is not None:
            self._iterator.close()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[str]:
        return aiter_in_thread(self)

    def drain(self) -> Any:
        """Run to the end and return :attr:`result` (None if cancelled)."""
        for _ in self:
            pass
        return self.result


def drain_all(streams: list[TokenStream], threads: int = 1) -> list:
    """The results of ``streams``, in order: one after another, or with ``threads`` > 1 each in
    its own thread (up to ``threads`` at once), so that they can decode together."""
    if threads <= 1 or len(streams) <= 1:
        return [s.drain() for s in streams]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(len(streams), threads), thread_name_prefix="kvboost-batch") as pool:
        return list(pool.map(TokenStream.drain, streams))


_STREAM_THREADS = 64
_executor = None
_executor_lock = threading.Lock()


def _stream_executor():
    """The threads async streams run in: not asyncio's default pool, whose min(32, cpus + 4)
    workers (6 on a 2-core machine) would cap concurrent ``ainvoke``/``abatch`` requests below the
    scheduler's ``max_batch``. The threads mostly wait on the engine."""
    global _executor
    with _executor_lock:
        if _executor is None:
            from concurrent.futures import ThreadPoolExecutor
            _executor = ThreadPoolExecutor(max_workers=_STREAM_THREADS, thread_name_prefix="kvboost-stream")
        return _executor


async def aiter_in_thread(stream: TokenStream) -> AsyncIterator[str]:
    """Iterate ``stream`` in a worker thread and yield its deltas on the event loop.

    The loop only awaits a queue, so other tasks run while the model decodes. If the consumer
    stops early or is cancelled, the worker is told to stop at the next token and awaited."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work() -> None:
        try:
            for delta in stream:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as exc:  # handed to the consumer, re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    worker = loop.run_in_executor(_stream_executor(), work)
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stream.cancel()
        await asyncio.shield(worker)
