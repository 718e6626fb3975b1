"""Fixtures for the integration tests; the models themselves are built in :mod:`kvb_models`."""
from __future__ import annotations

import pytest

from kvb_models import make_tiny_engine, shared_real_engine
from kvboost_rag_bench.testing import DOCS


@pytest.fixture
def tiny_engine():
    """A fresh tiny random engine with its own empty KV store."""
    return make_tiny_engine()


@pytest.fixture(scope="session")
def real_engine():
    """The engine default (SmolLM2-135M-Instruct), one per session."""
    return shared_real_engine()


@pytest.fixture
def docs():
    return list(DOCS[:3])  # the integration tests expect three documents
