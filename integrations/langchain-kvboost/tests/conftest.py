"""Fixtures of the langchain-kvboost tests: the shared ones of :mod:`kvboost_rag.testing.integration`
(offline environment, tiny and real engines)."""
from kvboost_rag.testing.integration import docs, qwen_engine_fixture, real_engine_fixture, tiny_engine_fixture  # noqa: F401


def pytest_collection_modifyitems(config, items):
    """A test class with ``only_tests`` (a standard suite run on another model for part of its
    tests) keeps only those."""
    keep, drop = [], []
    for item in items:
        only = getattr(getattr(item, "cls", None), "only_tests", None)
        name = getattr(item, "originalname", item.name)
        (drop if only is not None and name not in only else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
