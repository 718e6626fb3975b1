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
from . import validate
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
    write_behind: after an answer, encode and store in the background the documents it held that
        the store lacked, so the next prompt with them reuses them (:mod:`kvboost_rag.write_behind`);
        the answer itself is unchanged. False: nothing is ever written at query time.
    batching: concurrent requests (threads calling generate/stream, ``generate_batch``) decode
        together, one forward per step for all of them (:mod:`kvboost_rag.scheduler`); False: each
        request runs in its caller's thread under the engine's lock, one after another per step
        (measured on SmolLM2 bf16, 8 prompts of ~2.9k tokens, 128 new tokens: 2.9x the output-token
        throughput of sequential at 8 concurrent requests, greedy answers identical; a lone request
        runs in its caller's thread, as fast as with batching off; ``kvboost-rag bench
        --concurrency``).
    max_batch: most requests decoded together; others wait (prefilled) for a free row.
    max_waiting: most requests waiting for their prefill; one more is a
        :class:`~kvboost_rag.errors.SchedulerFullError`.
    batch_kv_bytes: KV memory the batch may reserve (rows x longest prompt+answer x bytes per
        token); a request that would exceed it waits for one to leave (a request alone always
        runs). 0 = no limit.
    """

    strategy: str = "cacheblend"
    blend: BlendConfig = field(default_factory=BlendConfig)
    preamble: Optional[str] = None
    model_name: Optional[str] = None
    prefix_cache_bytes: int = 256 << 20
    write_behind: bool = True
    batching: bool = True
    max_batch: int = 16
    max_waiting: int = 256
    batch_kv_bytes: int = 8 << 30

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.blend, BlendConfig):
            raise InvalidConfigError(f"blend must be a BlendConfig, got {type(self.blend).__name__}")
        validate.integer("prefix_cache_bytes", self.prefix_cache_bytes, minimum=0)
        if not isinstance(self.write_behind, bool):
            raise InvalidConfigError(f"write_behind must be True or False, got {self.write_behind!r}")
        if not isinstance(self.batching, bool):
            raise InvalidConfigError(f"batching must be True or False, got {self.batching!r}")
        validate.integer("max_batch", self.max_batch, minimum=1)
        validate.integer("max_waiting", self.max_waiting, minimum=1)
        validate.integer("batch_kv_bytes", self.batch_kv_bytes, minimum=0)
        if self.preamble is not None:
            validate.text("preamble", self.preamble)
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise InvalidConfigError(f"model_name must be a str or None, got {type(self.model_name).__name__}")

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
