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


class TokenStream:
    """Text deltas of one generation, as they are produced.

    - iterate (or ``next()``) for deltas; ``result`` holds the ``GenerationResult`` once done;
    - ``cancel()`` from any thread stops decoding at the next token; ``close()`` / ``with``;
    - ``timeout`` (seconds) raises :class:`TimeoutError` once exceeded;
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

    def _iterate(self) -> Iterator[str]:
        deadline = time.monotonic() + self.timeout if self.timeout else None
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
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"generation took longer than timeout={self.timeout}s")
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

    worker = loop.run_in_executor(None, work)
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
