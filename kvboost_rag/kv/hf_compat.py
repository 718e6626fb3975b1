"""The model-call keyword for a KV cache, chosen once for the installed transformers.

transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` (5.24 warns with a
FutureWarning on every call that uses the old name; 5.40 removes it), and model outputs carry the
cache as ``out.cache``. Older releases only know ``past_key_values``. Every forward call in the
package goes through :func:`cache_kwargs` / :func:`output_cache`, so the package keeps working,
silently, on both sides of the rename. The choice is made on first use (not at import, so that
importing this module does not import transformers: ``kvboost-rag --help`` stays fast).
"""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def cache_keyword() -> str:
    """``"cache"`` when the installed decoder models take it, else ``"past_key_values"``."""
    try:
        from transformers import LlamaForCausalLM
        params = inspect.signature(LlamaForCausalLM.forward).parameters
    except Exception:  # pragma: no cover - a broken or exotic install: keep the long-lived name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{"cache": cache}`` (or ``{"past_key_values": cache}``), to splat into ``model(...)``."""
    return {cache_keyword(): cache}


def output_cache(out):
    """The cache a forward returned (``out.cache``, or ``out.past_key_values`` on older releases)."""
    cache = getattr(out, "cache", None) if cache_keyword() == "cache" else None
    return cache if cache is not None else out.past_key_values
