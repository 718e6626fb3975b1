"""Deprecated import path, kept for one release: use :mod:`kvboost_rag.index.job`."""
import importlib
import sys
import warnings

warnings.warn("kvboost_rag.indexing is deprecated; import kvboost_rag.index.job", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("kvboost_rag.index.job")
