"""The kvboost-rag requirement of an integration distribution built inside this repository.

Used by ``integrations/*/setup.py`` (each computes its one dynamic field, ``dependencies``, with
:func:`core_requirement`), with the core's extras the integrations need (:data:`CORE_EXTRAS`). kvboost-rag (the core) is on no package index here, so a plain
``kvboost-rag`` requirement cannot be resolved by ``pip install ./integrations/<name>``. Built
inside the repository, an integration therefore requires the core from the checkout:
``kvboost-rag @ file:///<repository root>``. Otherwise it requires the plain version range, as a
wheel uploaded to an index must (PyPI refuses direct references):

* the sdist itself, and any wheel built from it (unpacked elsewhere this file is not there, and
  setup.py falls back to the plain range);
* ``KVBOOST_RELEASE_BUILD=1`` (forces the plain range, e.g. ``python -m build`` for a release);
* the installing environment already has a kvboost-rag in the range (``make setup`` installs the
  core editable first): a direct reference would make pip reinstall the core over it, non-editable.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


CORE = "kvboost-rag"
CORE_RANGE = ">=0.1.0,<0.2"


def _repository_root() -> Path | None:
    root = Path(__file__).resolve().parents[1]
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


#: The core's extras every integration needs: ``structured`` (outlines-core) for
#: ``with_structured_output`` / ``structured_predict`` / forced tool calls, which decode under a
#: JSON-schema constraint; without it they fail after a plain install.
CORE_EXTRAS = ("structured",)


def core_requirement(extras: tuple = CORE_EXTRAS) -> str:
    name = CORE + (f"[{','.join(extras)}]" if extras else "")
    plain = name + CORE_RANGE
    if os.environ.get("KVBOOST_RELEASE_BUILD", "") not in ("", "0") or "sdist" in sys.argv[1:]:
        return plain
    root = _repository_root()
    if root is None or _core_installed_in_target():
        return plain
    return f"{name} @ {root.as_uri()}"
