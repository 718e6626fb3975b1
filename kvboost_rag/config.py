"""One dataclass for everything an engine is configured with (nanoGPT-style), validated once.

``KVBoostEngine(model, tokenizer, config=EngineConfig(...))`` or the same fields as keyword
arguments (``KVBoostEngine(model, tokenizer, recompute_ratio=0.2)``), which build this object.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .blend import BlendConfig
from .defaults import DEFAULT_RECOMPUTE_RATIO
from .errors import InvalidConfigError

STRATEGIES = ("full", "reuse", "cacheblend")


@dataclass(frozen=True)
class EngineConfig:
    """strategy: default for every call. ``"cacheblend"``: stored KV re-rotated and repaired by
        selective recompute; ``"reuse"``: re-rotation only; ``"full"``: plain prefill (baseline).
    recompute_ratio, selection, check_layer, sink_tokens, block_size, reused_key_scale: the blend
        (:class:`~kvboost_rag.blend.BlendConfig`). The default, question-attention selection of 10%
        plus 4 sink tokens per document, is the measured best speed/fidelity point (README).
    preamble: text every document is encoded after (its KV dropped); default: the chat template's
        system turn, so documents are encoded as they will sit in a prompt.
    model_name: label for telemetry and framework metadata.
    prefix_cache_bytes: budget of the exact-KV cache of the text before the first document; 0 = off.
    """

    strategy: str = "cacheblend"
    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    selection: str = "attention"
    check_layer: int = 1
    sink_tokens: int = 4
    block_size: int = 128
    reused_key_scale: float = 1.0
    preamble: Optional[str] = None
    model_name: Optional[str] = None
    prefix_cache_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.prefix_cache_bytes < 0:
            raise InvalidConfigError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        self.blend  # validates the blend fields

    @property
    def blend(self) -> BlendConfig:
        return BlendConfig(recompute_ratio=self.recompute_ratio, selection=self.selection,
                           check_layer=self.check_layer, sink_tokens=self.sink_tokens, block_size=self.block_size,
                           reused_key_scale=self.reused_key_scale)

    @classmethod
    def from_kwargs(cls, base: Optional["EngineConfig"] = None, **overrides) -> "EngineConfig":
        """``base`` (default: defaults) with keyword overrides; unknown names are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
        values.update(overrides)
        return cls(**values)
