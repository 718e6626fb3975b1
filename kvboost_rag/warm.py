"""Deprecated import path, kept for one release: use :mod:`kvboost_rag.app.warm`."""
import importlib
import sys
import warnings

warnings.warn("kvboost_rag.warm is deprecated; import kvboost_rag.app.warm", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("kvboost_rag.app.warm")
