"""``kvboost-rag bench --concurrency`` and ``benchmarks/concurrency_bench.py`` (issue 14): one
implementation (kvboost_rag_bench.concurrency), rows for sequential and concurrent runs, answers
compared token for token with the sequential baseline. Tiny random-weight models (seconds)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvboost_rag_bench import cli, concurrency

ROOT = Path(__file__).resolve().parents[2]


def test_parse_levels():
    assert concurrency.parse_levels("1, 2,4,8") == [1, 2, 4, 8]
    for bad in ("", "0,2", "two", "1,-3"):
        with pytest.raises(ValueError):
            concurrency.parse_levels(bad)
    with pytest.raises(SystemExit, match="concurrency"):
        cli.main(["--concurrency", "1,x", "--random-weights", "tiny", "--device", "cpu", "--quiet"])


def test_cli_concurrency_random_weights(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert cli.main(["--random-weights", "tiny", "--device", "cpu", "--concurrency", "1,3", "--max-queries", "3",
                     "--k", "2", "--doc-tokens", "20", "--concurrency-tokens", "6", "--no-langchain",
                     "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["levels"] == [1, 3] and res["new_tokens"] == 6 and res["model"] == "random:tiny"
    modes = [r["mode"] for r in res["rows"]]
    assert modes == ["sequential (batching off)", "sequential (scheduler)", "3 concurrent threads"]
    for row in res["rows"]:
        assert row["answers"] == 3 and row["tokens_per_s"] > 0 and row["ttft_p95_s"] >= row["ttft_p50_s"] > 0
        assert row["same_as_sequential"] == 3  # greedy: token for token the sequential answers
        assert 0 < row["prefill_share"] < 1
    assert res["rows"][2]["scheduler"]["max_batch_seen"] >= 1  # how many overlap depends on timing
    assert res["rows"][2]["speedup_vs_sequential"] > 0
    assert [r["mode"] for r in res["summary"]] == modes
    printed = capsys.readouterr().out
    assert "3 concurrent threads" in printed and "same answers 3/3" in printed


def test_script_smoke_two_rounds(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("concurrency_bench", ROOT / "benchmarks" / "concurrency_bench.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "s.json"
    assert script.main(["--smoke", "--concurrency", "1,2", "--prompts", "2", "--tokens", "4", "--rounds", "2",
                        "--no-langchain", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rounds"] == 2 and len(res["rows"]) == 6
    assert {r["runs"] for r in res["summary"]} == {2}
    assert "median of 2 round(s)" in capsys.readouterr().out
