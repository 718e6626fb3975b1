"""Build script: computes the one dynamic field of pyproject.toml, ``dependencies``.

kvboost-rag (the core) is on no package index here, so a plain ``kvboost-rag`` requirement
cannot be resolved by ``pip install ./integrations/langchain-kvboost``. Built inside the
kvboost-rag repository (``../../pyproject.toml`` names ``kvboost-rag``), this package therefore
requires the core from that checkout: ``kvboost-rag @ file:///<repository root>``. Otherwise it
requires the plain version range, as a wheel uploaded to an index must (PyPI refuses direct
references):

* the sdist itself, and any wheel built from it (unpacked elsewhere: no repository around it);
* ``KVBOOST_RELEASE_BUILD=1`` (forces the plain range, e.g. ``python -m build`` for a release);
* the installing environment already has a kvboost-rag in the range (``make setup`` installs the
  core editable first): a direct reference would make pip reinstall the core over it, non-editable.

The same logic is in integrations/llama-index-llms-kvboost/setup.py (each sdist must build alone).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

CORE = "kvboost-rag"
CORE_RANGE = ">=0.1.0,<0.2"
OTHER_DEPENDENCIES = ["langchain-core>=1.0,<1.8"]


def _repository_root() -> Path | None:
    here = Path(__file__).resolve().parent
    if len(here.parents) < 2:
        return None
    root = here.parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    text = pyproject.read_text(encoding="utf-8")
    return root if re.search(rf'(?m)^name\s*=\s*"{CORE}"\s*$', text) else None


def _core_installed_in_target() -> bool:
    """Whether the environment pip installs into already has kvboost-rag in :data:`CORE_RANGE`.

    pip runs this script with that environment's interpreter but hides its site-packages (build
    isolation); ``-I`` ignores pip's ``PYTHONPATH`` overlay, so the child sees them."""
    probe = (
        "import sys\n"
        "from importlib import metadata\n"
        "try: v = metadata.version(sys.argv[1])\n"
        "except metadata.PackageNotFoundError: sys.exit(1)\n"
        "p = tuple(int(x) for x in v.split('+')[0].split('.')[:2] if x.isdigit())\n"
        "sys.exit(0 if (0, 1) <= p < (0, 2) else 1)\n"
    )
    try:
        return subprocess.run([sys.executable, "-I", "-c", probe, CORE], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def core_requirement() -> str:
    plain = CORE + CORE_RANGE
    if os.environ.get("KVBOOST_RELEASE_BUILD", "") not in ("", "0") or "sdist" in sys.argv[1:]:
        return plain
    root = _repository_root()
    if root is None or _core_installed_in_target():
        return plain
    return f"{CORE} @ {root.as_uri()}"


setup(install_requires=[core_requirement(), *OTHER_DEPENDENCIES])
