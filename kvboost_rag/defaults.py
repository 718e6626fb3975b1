"""Engine defaults that torch-free code needs (the CLI's help texts), in one place.

Importing this module imports nothing: ``kvboost-rag --help`` stays fast.
"""
from __future__ import annotations

# Share of reused document tokens that CacheBlend recomputes (``BlendConfig.recompute_ratio``).
DEFAULT_RECOMPUTE_RATIO = 0.1
