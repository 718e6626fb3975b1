"""Deprecated import path, kept for one release: use :mod:`kvboost_rag.decode.loop`."""
import importlib
import sys
import warnings

warnings.warn("kvboost_rag.generate is deprecated; import kvboost_rag.decode.loop", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("kvboost_rag.decode.loop")
