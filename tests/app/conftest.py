"""Fixtures of the CLI and warm-job tests."""
import pytest

from kvboost_rag.testing.store import tiny_model_factory


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight model and its tokenizer saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_model_factory()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
