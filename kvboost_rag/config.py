"""One dataclass for everything an engine is configured with, validated once.

``KVBoostEngine(model, tokenizer, config=EngineConfig(...))`` or the same fields as keyword
arguments (``KVBoostEngine(model, tokenizer, recompute_ratio=0.2)``), which build this object.
The blend's own settings are one nested :class:`~kvboost_rag.blend.BlendConfig`, written once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Optional

from .blend import BlendConfig
from .errors import InvalidConfigError

STRATEGIES = ("full", "reuse", "cacheblend")


@dataclass(frozen=True)
class EngineConfig:
    """strategy: default for every call. ``"cacheblend"``: stored KV re-rotated and repaired by
        selective recompute; ``"reuse"``: re-rotation only; ``"full"``: plain prefill (baseline).
    blend: how the blend recomputes (:class:`~kvboost_rag.blend.BlendConfig`: recompute_ratio,
        selection, check_layer, sink_tokens, block_size, reused_key_scale). The default,
        question-attention selection of 10% plus 4 sink tokens per document, is the measured best
        speed/fidelity point (README). Its fields are also accepted flat by :meth:`replace`,
        :meth:`from_kwargs` and the engine's keyword arguments (``recompute_ratio=0.2``).
    preamble: text every document is encoded after (its KV dropped); default: the chat template's
        system turn, so documents are encoded as they will sit in a prompt.
    model_name: label for telemetry and framework metadata.
    prefix_cache_bytes: budget of the exact-KV cache of the text before the first document; 0 = off.
    """

    strategy: str = "cacheblend"
    blend: BlendConfig = field(default_factory=BlendConfig)
    preamble: Optional[str] = None
    model_name: Optional[str] = None
    prefix_cache_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.blend, BlendConfig):
            raise InvalidConfigError(f"blend must be a BlendConfig, got {type(self.blend).__name__}")
        if self.prefix_cache_bytes < 0:
            raise InvalidConfigError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")

    def replace(self, **overrides) -> "EngineConfig":
        """A copy with ``overrides``: engine fields, or blend fields given flat; unknown names are
        a TypeError."""
        engine_fields = {f.name for f in fields(self)} - {"blend"}
        blend_fields = {f.name for f in fields(BlendConfig)}
        unknown = sorted(set(overrides) - engine_fields - blend_fields - {"blend"})
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(engine_fields | blend_fields)}")
        blend = overrides.pop("blend", self.blend)
        blend_overrides = {k: overrides.pop(k) for k in list(overrides) if k in blend_fields}
        if blend_overrides:
            blend = dataclasses.replace(blend, **blend_overrides)
        return dataclasses.replace(self, blend=blend, **overrides)

    @classmethod
    def from_kwargs(cls, base: Optional["EngineConfig"] = None, **overrides) -> "EngineConfig":
        """``base`` (default: defaults) with keyword overrides, as :meth:`replace`."""
        return (base if base is not None else cls()).replace(**overrides)
