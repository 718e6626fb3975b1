import os
import sys
from pathlib import Path

# Nothing may download weights: everything runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    """A tiny random llama engine with every test document warmed (a test module may override it)."""
    from kvboost_rag.testing.models import DOCS, tiny_engine

    e = tiny_engine("llama")
    e.warm(DOCS)
    return e
