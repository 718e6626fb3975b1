"""langchain-kvboost installs on its own into a fresh virtualenv from this repository (issue 13).

``pip install torch==2.13.0 && pip install ./integrations/langchain-kvboost`` must pull the core
(kvboost-rag, the repository root, on no package index) in from the checkout: setup.py requires
``kvboost-rag @ file:///<repository root>`` when built inside the repository. Then the Makefile's
order (core editable first, then the integration editable) must keep the core editable, and a
release build (``KVBOOST_RELEASE_BUILD=1``) must require the plain version range.

Marked ``slow`` (about a minute: torch from the local CPU wheel, the rest from the package index or
pip's cache); ``make test`` runs it. Skipped outside a repository checkout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DIST = Path(__file__).resolve().parents[2]  # integrations/langchain-kvboost
REPO = DIST.parents[1]
CHECK = """
import json, sys
from importlib import metadata
import langchain_kvboost, kvboost_rag
from langchain_kvboost import ChatKVBoost, KVBoostLLM
core = metadata.distribution("kvboost-rag")
direct = json.loads(core.read_text("direct_url.json") or "null")
print(json.dumps({"version": langchain_kvboost.__version__, "core_file": kvboost_rag.__file__, "direct": direct,
                  "requires": metadata.requires("langchain-kvboost"),
                  "editable": json.loads(metadata.distribution("langchain-kvboost").read_text("direct_url.json"))
                  .get("dir_info", {}).get("editable", False)}))
"""


def _run(args: list, cwd: Path, env: dict, timings: dict, label: str) -> str:
    start = time.perf_counter()
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    timings[label] = round(time.perf_counter() - start, 1)
    assert proc.returncode == 0, f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file() or not (REPO / "kvboost_rag").is_dir(),
                    reason="not inside the kvboost-rag repository")
def test_installs_into_a_fresh_virtualenv_with_the_core_from_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "KVBOOST_RELEASE_BUILD")}
    timings: dict = {}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env, timings, "venv")
    py = venv / "bin" / "python"
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(pip + ["torch==2.13.0"], tmp_path, env, timings, "torch")  # the CPU wheel, as the README says

    # A release build never carries a direct reference (PyPI refuses them).
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "release", DIST], tmp_path,
         {**env, "KVBOOST_RELEASE_BUILD": "1"}, timings, "release wheel")
    (wheel,) = (tmp_path / "release").glob("langchain_kvboost-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].replace(" ", "") for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    assert "kvboost-rag<0.2,>=0.1.0" in requires and not any("@" in r for r in requires)

    # The command: the core comes from this checkout.
    _run(pip + [DIST], tmp_path, env, timings, "install")
    out = json.loads(_run([py, "-c", CHECK], tmp_path, env, timings, "import"))
    assert out["version"] == "0.1.0"
    assert Path(out["core_file"]).is_relative_to(venv)  # installed into the venv, not found in the repo
    assert out["direct"]["url"] == REPO.as_uri() and not out["direct"].get("dir_info", {}).get("editable")
    assert f"kvboost-rag@{REPO.as_uri()}" in [r.replace(" ", "") for r in out["requires"]]

    # The Makefile's order: the core editable, then the integration editable; the core stays editable.
    _run(pip + ["-e", REPO], tmp_path, env, timings, "core -e")
    _run(pip + ["-e", DIST], tmp_path, env, timings, "integration -e")
    out = json.loads(_run([py, "-c", CHECK], tmp_path, env, timings, "import -e"))
    assert out["direct"]["url"] == REPO.as_uri() and out["direct"]["dir_info"].get("editable") is True
    assert Path(out["core_file"]).is_relative_to(REPO) and out["editable"] is True
    print("timings (s):", timings)
