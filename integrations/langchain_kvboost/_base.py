"""What :class:`ChatKVBoost` and :class:`KVBoostLLM` share: the engine, generation parameters,
and the translation of engine telemetry. Streaming (deadline, cancel, the async bridge) is the
core's :class:`kvboost_rag.streaming.TokenStream`, returned by ``engine.stream``.

Both classes are thin: they turn LangChain inputs into an engine prompt (a string or a list of
:class:`kvboost_rag.Segment`), call the engine, and turn its :class:`GenerationResult` into
LangChain usage/response metadata. Nothing here knows about KV caches.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from kvboost_rag.engine import LazyEngineMixin

#: Reported as the model name before a lazily configured engine has been loaded
#: (the engine's default model is SmolLM2-135M-Instruct).

# Keyword arguments a caller may override per call (``model.invoke(..., temperature=0.7)``).
_CALL_OVERRIDES = ("temperature", "max_tokens", "top_p", "top_k", "seed", "strategy", "recompute_ratio", "timeout")


class KVBoostParams(LazyEngineMixin, BaseModel):
    """Engine ownership and generation parameters, shared by the chat model and the LLM.

    Build from a model (``from_model_id``, loaded lazily on first use) or from an engine that is
    already loaded (``engine=...``), so that several LangChain objects share one model and one KV
    store.
    """

    model_id: Optional[str] = None
    """HF id, local folder or ``.gguf`` file; ``None`` is the engine default (SmolLM2-135M-Instruct)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to ``KVBoostEngine.shared`` (``from_pretrained``) when the engine is loaded lazily."""
    engine: Any = Field(default=None, exclude=True)
    """A loaded ``KVBoostEngine``; ``None`` until first use when built from ``model_id``."""

    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    max_tokens: Optional[int] = 256
    """Maximum number of new tokens (the engine's ``max_new_tokens``)."""
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    """Default stop sequences (a ``stop=`` given at call time replaces them)."""
    strategy: Optional[str] = None
    """``"cacheblend"`` (engine default), ``"reuse"`` or ``"full"`` (no reuse, the baseline)."""
    recompute_ratio: Optional[float] = None
    """Fraction of reused tokens CacheBlend recomputes; ``None`` keeps the engine's setting."""
    timeout: Optional[float] = None
    """Seconds a generation may take; past it decoding stops and ``TimeoutError`` is raised."""
    max_retries: int = 0
    """Accepted for LangChain's standard parameters. A local model has no transient network
    failures to retry, so it is not used."""
    streaming: bool = False
    """Whether ``invoke`` goes through the streaming path (token callbacks fire either way)."""

    @classmethod
    def from_model_id(cls, model_id: Optional[str] = None, *, engine_kwargs: Optional[dict] = None,
                      **kwargs: Any):
        """Configure from a model id/path; the model loads on first use, not here.

        Keyword arguments that are fields of this class (``temperature``, ``max_tokens``...)
        configure it; every other keyword goes to ``KVBoostEngine.shared`` (``from_pretrained``)
        (``store=``, ``device=``, ``strategy`` of the engine is a field here).
        """
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_fields}
        return cls(model_id=model_id, engine_kwargs={**(engine_kwargs or {}), **kwargs}, **fields)

    def _generation_kwargs(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> dict[str, Any]:
        """``engine.stream`` keyword arguments for one call (its ``timeout`` included)."""
        requested_model = kwargs.get("model")
        if isinstance(requested_model, str) and requested_model not in (self.model_label, self.model_id):
            raise ValueError(
                f"{type(self).__name__} serves the one model its engine loaded ({self.model_label!r}); "
                f"it cannot switch to {requested_model!r} per call. Build another instance for it."
            )
        params = {name: getattr(self, name) for name in _CALL_OVERRIDES}
        params.update({k: v for k, v in kwargs.items() if k in _CALL_OVERRIDES})
        stop = self.stop if stop is None else stop
        out: dict[str, Any] = {
            "timeout": params["timeout"],
            "temperature": float(params["temperature"] or 0.0),
            "top_p": params["top_p"],
            "top_k": params["top_k"],
            "seed": params["seed"],
            "stop": list(stop) if stop else None,
        }
        if params["max_tokens"] is not None:
            out["max_new_tokens"] = int(params["max_tokens"])
        if params["strategy"] is not None:
            out["strategy"] = params["strategy"]
        if params["recompute_ratio"] is not None:
            out["recompute_ratio"] = params["recompute_ratio"]
        return out


def usage_metadata(result: Any) -> dict:
    """LangChain ``UsageMetadata``: reused KV tokens are reported as ``cache_read`` input tokens."""
    return {
        "input_tokens": int(result.prompt_tokens),
        "output_tokens": int(result.completion_tokens),
        "total_tokens": int(result.prompt_tokens) + int(result.completion_tokens),
        "input_token_details": {"cache_read": int(result.reused_tokens)},
    }


def response_metadata(result: Any, model_name: str) -> dict:
    """Engine telemetry for ``response_metadata`` / ``generation_info``."""
    return {"model_name": model_name, **result.telemetry()}

