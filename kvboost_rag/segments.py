"""Deprecated import path, kept for one release: use :mod:`kvboost_rag.prompt.segments`."""
import importlib
import sys
import warnings

warnings.warn("kvboost_rag.segments is deprecated; import kvboost_rag.prompt.segments", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("kvboost_rag.prompt.segments")
