"""The distribution as LlamaIndex expects it: class hierarchy, namespace package, version."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from llama_index.core.base.llms.base import BaseLLM

import llama_index.llms.kvboost as kvboost
from llama_index.llms.kvboost import KVBoostLLM


def test_llm_class():
    names_of_base_classes = [b.__name__ for b in KVBoostLLM.__mro__]
    assert BaseLLM.__name__ in names_of_base_classes


def test_all():
    assert sorted(kvboost.__all__) == sorted(
        ["KVBoostLLM", "KVBoostSynthesizer", "KVBoostWarmer", "TelemetryRecorder", "message_to_engine", "telemetry"])


def test_version_is_the_installed_distribution():
    assert kvboost.__version__ == metadata.version("llama-index-llms-kvboost")


def test_namespace_package_has_no_parent_init():
    root = Path(__file__).resolve().parents[1]
    assert not (root / "llama_index" / "__init__.py").exists()
    assert not (root / "llama_index" / "llms" / "__init__.py").exists()
    assert (root / "llama_index" / "llms" / "kvboost" / "__init__.py").exists()
