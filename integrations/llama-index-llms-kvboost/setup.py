"""Build script: computes the one dynamic field of pyproject.toml, ``dependencies``.

Inside the kvboost-rag repository the core requirement comes from ``../core_requirement.py``
(``kvboost-rag @ file:///<repository root>`` unless the core is already installed or this is a
release build, ``KVBOOST_RELEASE_BUILD=1``); anywhere else (an sdist, a wheel built from it) it
is the plain version range.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup

# The core with its ``structured`` extra (outlines-core: with_structured_output / structured_predict).
CORE_PLAIN = "kvboost-rag[structured]>=0.1.0,<0.2"
OTHER_DEPENDENCIES = ["llama-index-core>=0.14,<0.15"]


def core_requirement() -> str:
    shared = Path(__file__).resolve().parent.parent / "core_requirement.py"
    if not shared.is_file():
        return CORE_PLAIN
    spec = importlib.util.spec_from_file_location("kvboost_core_requirement", shared)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.core_requirement()


setup(install_requires=[core_requirement(), *OTHER_DEPENDENCIES])
