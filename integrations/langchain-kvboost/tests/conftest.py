"""Fixtures of the langchain-kvboost tests: the shared ones of :mod:`kvboost_rag_bench.integration_testing`
(offline environment, tiny and real engines)."""
from kvboost_rag_bench.integration_testing import docs, real_engine_fixture, tiny_engine_fixture  # noqa: F401
