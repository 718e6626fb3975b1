"""llama-index-llms-kvboost installs on its own into a fresh virtualenv from this repository (issue 13).

``pip install torch==2.13.0 && pip install ./integrations/llama-index-llms-kvboost`` must pull the core
(kvboost-rag, the repository root, on no package index) in from the checkout: setup.py requires
``kvboost-rag @ file:///<repository root>`` when built inside the repository. Then the Makefile's
order (core editable first, then the integration editable) must keep the core editable, and a
release build (``KVBOOST_RELEASE_BUILD=1``) must require the plain version range.

Marked ``slow`` (about a minute: torch from the local CPU wheel, the rest from the package index or
pip's cache); ``make test`` runs it. Skipped outside a repository checkout.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kvboost_rag.testing.integration import TINY_ENGINE_CHECK, check_fresh_install

pytestmark = pytest.mark.slow

DIST = Path(__file__).resolve().parents[1]  # integrations/llama-index-llms-kvboost
REPO = DIST.parents[1]


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file() or not (REPO / "kvboost_rag").is_dir(),
                    reason="not inside the kvboost-rag repository")
def test_installs_into_a_fresh_virtualenv_with_the_core_from_the_repository(tmp_path):
    timings = check_fresh_install(
        DIST, tmp_path, distribution="llama-index-llms-kvboost", module="llama_index.llms.kvboost",
        # structured output after a plain install: outlines-core comes with the core's `structured` extra
        extra_check=TINY_ENGINE_CHECK + "from llama_index.llms.kvboost import KVBoostLLM\n"
                    "from llama_index.core.llms.function_calling import FunctionCallingLLM\n"
                    "from llama_index.core.prompts import PromptTemplate\n"
                    "assert issubclass(KVBoostLLM, FunctionCallingLLM)\n"
                    "llm = KVBoostLLM(engine=engine, max_new_tokens=3)\n"
                    "assert isinstance(llm.structured_predict(City, PromptTemplate('A city near {p}.'), p='Lyon'), City)")
    print("timings (s):", timings)
