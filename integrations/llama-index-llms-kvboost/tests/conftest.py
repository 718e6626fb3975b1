"""Fixtures of the llama-index-llms-kvboost tests: the shared ones of :mod:`kvboost_rag.testing.integration`
(offline environment, tiny and real engines)."""
from kvboost_rag.testing.integration import docs, qwen_engine_fixture, real_engine_fixture, tiny_engine_fixture  # noqa: F401
