"""The fault campaign runs in ``make test`` in its quick form (kills, concurrency, hostile files:
about 15 s on 2 cores; the bad-input section has its own tests), and both campaign scripts have
real command lines."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kvboost_rag.testing.store import PYTHON, python_env

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", ["fault_campaign.py", "bad_input_campaign.py"])
def test_campaign_help_prints_usage_and_exits_0(script):
    proc = subprocess.run([PYTHON, str(BENCH / script), "--help"], env=python_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script}") and "--json" in proc.stdout
    assert "tried" not in proc.stdout  # help only: the campaign did not run


def test_fault_campaign_rejects_an_unknown_section():
    proc = subprocess.run([PYTHON, str(BENCH / "fault_campaign.py"), "--sections", "kills,bogus"],
                          env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bogus" in proc.stderr


def test_quick_fault_campaign_every_must_be_zero_figure_is_zero(tmp_path):
    out = tmp_path / "campaign.json"
    proc = subprocess.run([PYTHON, str(BENCH / "fault_campaign.py"), "--quick", "--sections",
                           "kills,concurrency,faults", "--json", str(out)],
                          env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    zero = results["must_be_zero"]
    assert {"kills.corrupt_served", "kills.finished_lost", "concurrency.corrupt_served", "faults.crashes",
            "faults.hangs", "faults.bad_served", "faults.foreign_touched"} <= set(zero)
    assert all(v == 0 for v in zero.values()), zero
    assert results["kills"]["kills"] == 8 and results["kills"]["entries_checked"] > 0
    assert results["concurrency"]["reads"] > 0 and results["concurrency"]["writes"] > 0
    assert len(results["faults"]["faults"]) == 11
    assert "OK: every must-be-zero figure is 0" in proc.stdout
