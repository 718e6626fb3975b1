"""Deprecated import path, kept for one release: use :mod:`kvboost_rag.store.disk`."""
import importlib
import sys
import warnings

warnings.warn("kvboost_rag.disk_store is deprecated; import kvboost_rag.store.disk", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("kvboost_rag.store.disk")
