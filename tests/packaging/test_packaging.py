"""The three distributions of this repository, built as wheels: what each one ships and requires.

``kvboost-rag`` (root) ships ``kvboost_rag`` and ``kvboost_rag_bench`` only;
``langchain-kvboost`` ships ``langchain_kvboost``; ``llama-index-llms-kvboost`` ships the
namespace package ``llama_index/llms/kvboost`` with no ``llama_index/__init__.py`` and no
``llama_index/llms/__init__.py`` (it must not shadow llama-index-core). Both integrations require
``kvboost-rag[structured]`` as a plain requirement (no PEP 508 direct reference, which PyPI
refuses). Every distribution declares its license as an SPDX string and ships ``py.typed``.

Marked ``slow`` (about 30 s: three wheel builds, no network: ``--no-build-isolation`` uses this
environment's setuptools). ``make test`` runs it. The full fresh-virtualenv install (torch
included) is opt-in, ``KVBOOST_FRESH_VENV_TEST=1``: it takes minutes (see README, "Installing the
integrations").
"""
from __future__ import annotations

import email
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {
    "kvboost_rag": ROOT,
    "langchain_kvboost": ROOT / "integrations" / "langchain-kvboost",
    "llama_index_llms_kvboost": ROOT / "integrations" / "llama-index-llms-kvboost",
}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    for source in DISTRIBUTIONS.values():
        # A release build: the integrations' setup.py then requires the plain kvboost-rag range
        # (inside the repository it would otherwise point at the checkout when the core is absent).
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(source)], check=True, capture_output=True, text=True,
                       env={**os.environ, "KVBOOST_RELEASE_BUILD": "1"})
    built = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(built) == set(DISTRIBUTIONS), built
    return built


def _contents(wheel: Path) -> tuple[list[str], email.message.Message]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return names, email.message_from_bytes(zf.read(meta_name))


def _top_level(names: list[str]) -> set[str]:
    return {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}


def test_core_wheel_ships_no_integration(wheels):
    names, meta = _contents(wheels["kvboost_rag"])
    assert _top_level(names) == {"kvboost_rag", "kvboost_rag_bench"}
    assert meta["Name"] == "kvboost-rag" and meta["Version"] == "0.1.0"
    requires = meta.get_all("Requires-Dist")
    assert not any(r.startswith(("langchain-kvboost", "llama-index-llms-kvboost")) for r in requires)
    assert "kvboost_rag/frameworks/options.py" in names
    assert "kvboost_rag/py.typed" in names  # PEP 561: type checkers read the annotations
    assert meta["License-Expression"] == "Apache-2.0"  # an SPDX string, not the deprecated table


def test_langchain_wheel(wheels):
    names, meta = _contents(wheels["langchain_kvboost"])
    assert _top_level(names) == {"langchain_kvboost"}
    assert "langchain_kvboost/py.typed" in names and not any("tests/" in n for n in names)
    assert meta["Name"] == "langchain-kvboost" and meta["Version"] == "0.1.0"
    requires = [r.replace(" ", "") for r in meta.get_all("Requires-Dist")]
    # the core's structured extra (outlines-core): with_structured_output works after a plain install
    assert "kvboost-rag[structured]<0.2,>=0.1.0" in requires and "langchain-core<1.8,>=1.0" in requires
    assert not any("@" in r for r in requires)  # no direct reference: uploadable to PyPI
    assert any(r.startswith("langchain-tests") and 'extra=="test"' in r for r in requires)


def test_every_distribution_declares_an_spdx_license(wheels):
    """setuptools deprecates ``project.license`` as a table (it warns on every build): SPDX strings."""
    for source in DISTRIBUTIONS.values():
        text = (source / "pyproject.toml").read_text()
        assert 'license = "Apache-2.0"' in text and "license = {" not in text


def test_integration_test_runs_hide_no_deprecation_and_print_no_benchmark_table():
    """No blanket DeprecationWarning filter (a third-party warning is filtered narrowly, by
    category and module, with a comment naming it); langchain-tests' pytest-benchmark is quiet."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    for name in ("langchain_kvboost", "llama_index_llms_kvboost"):
        options = tomllib.loads((DISTRIBUTIONS[name] / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
        assert all("DeprecationWarning" not in f and f.count(":") >= 3 for f in options.get("filterwarnings", [])), name
    langchain = tomllib.loads((DISTRIBUTIONS["langchain_kvboost"] / "pyproject.toml").read_text())
    assert "--benchmark-disable" in langchain["tool"]["pytest"]["ini_options"]["addopts"]


def test_llama_index_wheel_is_a_namespace_package(wheels):
    names, meta = _contents(wheels["llama_index_llms_kvboost"])
    assert _top_level(names) == {"llama_index"}
    assert "llama_index/__init__.py" not in names and "llama_index/llms/__init__.py" not in names
    assert "llama_index/llms/kvboost/__init__.py" in names and "llama_index/llms/kvboost/py.typed" in names
    assert all(n.startswith("llama_index/llms/kvboost/") for n in names if n.startswith("llama_index/"))
    assert meta["Name"] == "llama-index-llms-kvboost" and meta["Version"] == "0.1.0"
    requires = [r.replace(" ", "") for r in meta.get_all("Requires-Dist")]
    assert "kvboost-rag[structured]<0.2,>=0.1.0" in requires and "llama-index-core<0.15,>=0.14" in requires
    assert not any("@" in r for r in requires)


@pytest.mark.skipif(os.environ.get("KVBOOST_FRESH_VENV_TEST") != "1",
                    reason="minutes (torch into a fresh virtualenv); set KVBOOST_FRESH_VENV_TEST=1 to run")
def test_wheels_install_into_a_fresh_virtualenv(wheels, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU wheel first
    subprocess.run(pip + [str(w) for w in wheels.values()], check=True)
    code = ("import kvboost_rag, langchain_kvboost, llama_index.llms.kvboost as li, llama_index.core;"
            "print(kvboost_rag.__version__, langchain_kvboost.__version__, li.__version__)")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["0.1.0", "0.1.0", "0.1.0"]
