"""langchain-kvboost installs on its own into a fresh virtualenv from this repository (issue 13).

``pip install torch==2.13.0 && pip install ./integrations/langchain-kvboost`` must pull the core
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

DIST = Path(__file__).resolve().parents[2]  # integrations/langchain-kvboost
REPO = DIST.parents[1]


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file() or not (REPO / "kvboost_rag").is_dir(),
                    reason="not inside the kvboost-rag repository")
def test_installs_into_a_fresh_virtualenv_with_the_core_from_the_repository(tmp_path):
    # structured output after a plain install: outlines-core comes with the core's `structured` extra
    timings = check_fresh_install(
        DIST, tmp_path, distribution="langchain-kvboost", module="langchain_kvboost",
        extra_check=TINY_ENGINE_CHECK + "from langchain_kvboost import ChatKVBoost, KVBoostLLM\n"
        "assert isinstance(ChatKVBoost(engine=engine, max_tokens=3).with_structured_output(City).invoke('a city'), City)\n"
        "City.model_validate_json(KVBoostLLM(engine=engine, max_tokens=3).invoke('a city', response_format=City))")
    print("timings (s):", timings)
