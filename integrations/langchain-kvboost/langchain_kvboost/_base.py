"""What :class:`ChatKVBoost` and :class:`KVBoostLLM` share: the engine, generation parameters,
and the translation of engine telemetry. Streaming (deadline, cancel, the async bridge) is the
core's :class:`kvboost_rag.serve.streaming.TokenStream`, returned by ``engine.stream``.

Both classes are thin: they turn LangChain inputs into an engine prompt (a string or a list of
:class:`kvboost_rag.Segment`), call the engine, and turn its :class:`GenerationResult` into
LangChain usage/response metadata. The rules shared with the LlamaIndex integration (option
merging and checking, telemetry, lazy engine) are the core's :mod:`kvboost_rag.frameworks.options`.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvboost_rag import validate
from kvboost_rag.frameworks import options as integration
from kvboost_rag.errors import InvalidConfigError

# Call arguments langchain-core itself consumes (``stream`` picks the streaming path).
_FRAMEWORK_CALL_ARGS = ("stream",)


class KVBoostParams(integration.EngineHolder, BaseModel):
    """Engine ownership and generation parameters, shared by the chat model and the LLM.

    Build from a model (``from_model_id``, loaded lazily on first use) or from an engine that is
    already loaded (``engine=...``), so that several LangChain objects share one model and one KV
    store. Unknown constructor arguments are an error (``extra="forbid"``).
    """

    model_config = ConfigDict(extra="forbid")

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
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further generation options passed to ``engine.stream`` as is, under the engine's names
    (as ``model_kwargs`` of other LangChain integrations, e.g. ``{"repetition_penalty": 1.1}``).
    Checked at construction: an option the engine does not implement is an error."""
    max_retries: int = 0
    """Accepted for LangChain's standard parameters. A local model has no transient network
    failures to retry, so it is not used."""
    streaming: bool = False
    """Whether ``invoke`` goes through the streaming path (token callbacks fire either way)."""

    def __init__(self, **data: Any) -> None:
        # Checked before pydantic, so a bad value is a KVBoostError naming it (pydantic would wrap
        # it in a ValidationError).
        if "max_retries" in data:
            validate.integer("max_retries", data["max_retries"], minimum=0)
        super().__init__(**data)

    @field_validator("model_kwargs")
    @classmethod
    def _check_model_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        return integration.check_generation_options(value, owner=cls.__name__, where="model_kwargs",
                                                    reserved=_RESERVED, error=InvalidConfigError)

    @classmethod
    def from_model_id(cls, model_id: Optional[str] = None, *, engine_kwargs: Optional[dict] = None,
                      **kwargs: Any):
        """Configure from a model id/path; the model loads on first use, not here.

        Keyword arguments that are fields of this class (``temperature``, ``max_tokens``...)
        configure it; every other keyword goes to ``KVBoostEngine.shared`` (``from_pretrained``)
        (``store=``, ``device=``; ``strategy`` of the engine is a field here).
        """
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_fields}
        return cls(model_id=model_id, engine_kwargs={**(engine_kwargs or {}), **kwargs}, **fields)

    def _generation_kwargs(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> dict[str, Any]:
        """``engine.stream`` keyword arguments for one call (its ``timeout`` included).

        Call arguments may override any generation option (``invoke(..., temperature=0.7)``,
        ``max_tokens=``, or an engine option such as ``repetition_penalty=``); unknown ones raise."""
        call = {k: v for k, v in kwargs.items() if k not in _FRAMEWORK_CALL_ARGS}
        requested_model = call.pop("model", None)
        if requested_model is not None and requested_model not in (self.model_label, self.model_id):
            raise ValueError(
                f"{type(self).__name__} serves the one model its engine loaded ({self.model_label!r}); "
                f"it cannot switch to {requested_model!r} per call. Build another instance for it."
            )
        settings = {engine_name: getattr(self, field) for field, engine_name in _OPTION_FIELDS}
        if stop is not None:
            call["stop"] = stop
        return integration.generation_kwargs(settings, passthrough=self.model_kwargs, call=call,
                                             owner=type(self).__name__)


# Fields that are engine generation options, as (field name, engine name): read from the engine's
# option names (the fields of SamplingParams and the request's own), so a field named like one
# passes through with no list to keep here.
_OPTION_FIELDS = integration.option_fields(KVBoostParams.model_fields)
_RESERVED = tuple(name for pair in _OPTION_FIELDS for name in pair)


def check_batch_config(config: Any) -> None:
    """``batch(config=...)``: every ``max_concurrency`` is None or an integer >= 1 (0 would make
    LangChain's thread pool raise a bare ValueError, and ``abatch`` wait forever)."""
    for c in config if isinstance(config, (list, tuple)) else [config]:
        if isinstance(c, dict) and c.get("max_concurrency") is not None:
            validate.integer("max_concurrency", c["max_concurrency"], minimum=1)


class CheckedBatch:
    """``batch`` / ``abatch`` with their config checked first (:func:`check_batch_config`); mixed
    in before the LangChain base class of each model."""

    def batch(self, inputs: list, config: Any = None, **kwargs: Any) -> list:
        check_batch_config(config)
        return super().batch(inputs, config, **kwargs)

    async def abatch(self, inputs: list, config: Any = None, **kwargs: Any) -> list:
        check_batch_config(config)
        return await super().abatch(inputs, config, **kwargs)


def usage_metadata(result: Any) -> dict:
    """LangChain ``UsageMetadata``: reused KV tokens are reported as ``cache_read`` input tokens."""
    counts = integration.usage(result)
    return {
        "input_tokens": counts["input_tokens"],
        "output_tokens": counts["output_tokens"],
        "total_tokens": counts["total_tokens"],
        "input_token_details": {"cache_read": counts["cache_read_tokens"]},
    }


def response_metadata(result: Any, model_name: str) -> dict:
    """Engine telemetry for ``response_metadata`` / ``generation_info`` (TTFT, reused /
    recomputed / fresh tokens, documents reused)."""
    return integration.telemetry(result, model_name)
