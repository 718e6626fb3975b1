"""Running ``engine.stream`` from LlamaIndex's sync and async entry points.

The engine decodes in the calling thread; async methods run it in a worker thread and hand the
deltas over through an asyncio queue, so the event loop is never blocked by the model.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Iterator

class EngineStream:
    """Deltas of one ``engine.stream(prompt, **kwargs)``; ``result`` is set once it finished.

    The engine serialises decoding itself, so LLM calls from several threads are safe."""

    def __init__(self, engine: Any, prompt: Any, gen_kwargs: dict) -> None:
        self.engine, self.prompt, self.gen_kwargs = engine, prompt, gen_kwargs
        self.result = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        stream = self.engine.stream(self.prompt, **self.gen_kwargs)
        events = iter(stream)
        try:
            for delta in events:
                if delta:
                    yield delta
                if self._cancelled.is_set():
                    return
            self.result = stream.result
        finally:
            # Stopped early (cancel, error): close the engine's generator here, in the thread
            # that holds the engine's lock, rather than leaving it to the garbage collector.
            close = getattr(events, "close", None)
            if self.result is None and callable(close):
                close()


async def aiter_in_thread(stream: EngineStream) -> AsyncIterator[str]:
    """Yield ``stream``'s deltas as a worker thread decodes them; stop the worker if abandoned."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work() -> None:
        try:
            for delta in stream:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as exc:  # re-raised in the consumer
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
