"""Everything an engine is configured with, validated once, torch-free: :class:`EngineConfig` and
its nested :class:`BlendConfig`, and the defaults the CLI's help texts show.

``KVBoostEngine(model, tokenizer, config=EngineConfig(...))`` or the same fields as keyword
arguments (``KVBoostEngine(model, tokenizer, recompute_ratio=0.2)``), which build this object.
The blend's own settings are one nested :class:`BlendConfig`, written once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from kvboost_rag import validate
from kvboost_rag.errors import InvalidConfigError, UnknownOptionError

STRATEGIES = ("full", "reuse", "cacheblend")

# How a document's KV may have been encoded: after a context of related documents, or alone.
ENCODINGS = ("context", "isolated")

# Bits per stored KV value in a new store: 8 (int8 with per-channel scales, kv.quantize) halves a
# store's disk and fetch against 16 with answer quality within noise (docs/benchmarks.md). A disk
# store records the setting it was created with (store.settings) and keeps it.
DEFAULT_KV_BITS = 8

# Share of reused document tokens that CacheBlend recomputes (``BlendConfig.recompute_ratio``).
DEFAULT_RECOMPUTE_RATIO = 0.1

# Rules that rank reused tokens for recompute, by name: filled by :mod:`kvboost_rag.blend.selection`
# (and by anyone registering a rule of their own), read by :class:`BlendConfig` to check its name.
SELECTION_RULES: dict[str, Callable[[Any], Any]] = {}


@dataclass(frozen=True)
class BlendConfig:
    """How much to recompute and how to choose it.

    recompute_ratio: share of reused tokens recomputed through every layer (0..1).
    selection: the rule that ranks reused tokens, a name in
        :data:`SELECTION_RULES` (filled by :mod:`kvboost_rag.blend.selection`). ``"attention"`` (default): the
        question runs alone over the reused KV and ranks tokens by the attention it pays them.
        ``"value"`` / ``"key"``: deviation of their V / K at the check layer (CacheBlend's rule).
    check_layer: layer at which the deviation rules measure (layers before it run for all tokens).
    sink_tokens: first tokens of each reused document always recomputed (they were attention
        sinks when the document was encoded alone).
    block_size: query block size of the masked attention over scattered tokens (128 was the
        fastest block size on the benchmark's prompts; see docs/benchmarks.md).
    reused_key_scale: factor on the keys of reused tokens that are not recomputed (an attention
        temperature of 1/scale on stale KV, APE-style; 1.0 = off). Recomputed tokens get fresh
        keys, so at ratio 1.0 the result is a full prefill's whatever the factor.
    """

    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    selection: str = "attention"
    check_layer: int = 1
    sink_tokens: int = 4
    block_size: int = 128
    reused_key_scale: float = 1.0

    def __post_init__(self) -> None:
        ratio = self.recompute_ratio
        if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
            raise InvalidConfigError(f"recompute_ratio must be a number within [0, 1], got {ratio!r}")
        if self.selection not in SELECTION_RULES:
            raise InvalidConfigError(f"selection must be one of {sorted(SELECTION_RULES)}, got {self.selection!r}")
        if not (isinstance(self.reused_key_scale, (int, float)) and self.reused_key_scale > 0):
            raise InvalidConfigError(f"reused_key_scale must be > 0, got {self.reused_key_scale!r}")
        if self.check_layer < 0 or self.sink_tokens < 0 or self.block_size < 1:
            raise InvalidConfigError("check_layer and sink_tokens must be >= 0, block_size >= 1")


@dataclass(frozen=True)
class EngineConfig:
    """strategy: default for every call. ``"cacheblend"``: stored KV re-rotated and repaired by
        selective recompute; ``"reuse"``: re-rotation only; ``"full"``: plain prefill (baseline).
    blend: how the blend recomputes (:class:`BlendConfig`: recompute_ratio,
        selection, check_layer, sink_tokens, block_size, reused_key_scale). The default,
        question-attention selection of 10% plus 4 sink tokens per document, is the best
        speed/fidelity trade-off on the benchmark (docs/benchmarks.md). Its fields are also
        accepted flat by :meth:`replace`, :meth:`from_kwargs` and the engine's keyword arguments
        (``recompute_ratio=0.2``).
    preamble: text every document is encoded after (its KV dropped); default: the chat template's
        system turn, so documents are encoded as they will sit in a prompt.
    model_name: label for telemetry and framework metadata.
    prefix_cache_bytes: budget of the exact-KV cache of the text before the first document; 0 = off.
    write_behind: after an answer, encode and store in the background the documents it held that
        the store lacked, so the next prompt with them reuses them (:mod:`kvboost_rag.index.write_behind`);
        the answer itself is unchanged. False: nothing is ever written at query time.
    batching: concurrent requests (threads calling generate/stream, ``generate_batch``) decode
        together, one forward per step for all of them (:mod:`kvboost_rag.serve.scheduler`); False: each
        request runs in its caller's thread under the engine's lock, one after another per step.
        Batching raises output-token throughput under concurrent requests without changing greedy
        answers, and a lone request still runs in its caller's thread, as fast as with batching
        off (docs/benchmarks.md; ``kvboost-rag bench --concurrency``).
    encodings: which stored entries a document's KV is taken from, in order of preference:
        ``"context"`` (encoded after related documents, :mod:`kvboost_rag.index.context`) and
        ``"isolated"`` (encoded alone). ``("isolated",)`` ignores context-encoded entries.
    learn_context: count which stored documents arrive in prompts together
        (:mod:`kvboost_rag.index.coretrieval`) and, when a document keeps arriving with partners
        outside the context it was encoded with, re-encode it in the background (the write-behind
        worker, when idle) after its most frequent partners; needs ``write_behind``.
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
    encodings: tuple = ENCODINGS
    learn_context: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        encodings = (self.encodings,) if isinstance(self.encodings, str) else self.encodings
        if (not isinstance(encodings, (tuple, list)) or not encodings or len(set(encodings)) != len(encodings)
                or any(e not in ENCODINGS for e in encodings)):
            raise InvalidConfigError(f"encodings must be a non-empty tuple of distinct names from {ENCODINGS}, "
                                     f"got {self.encodings!r}")
        object.__setattr__(self, "encodings", tuple(encodings))
        if not isinstance(self.blend, BlendConfig):
            raise InvalidConfigError(f"blend must be a BlendConfig, got {type(self.blend).__name__}")
        validate.integer("prefix_cache_bytes", self.prefix_cache_bytes, minimum=0)
        if not isinstance(self.write_behind, bool):
            raise InvalidConfigError(f"write_behind must be True or False, got {self.write_behind!r}")
        if not isinstance(self.learn_context, bool):
            raise InvalidConfigError(f"learn_context must be True or False, got {self.learn_context!r}")
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
        an UnknownOptionError (also a TypeError)."""
        engine_fields = {f.name for f in fields(self)} - {"blend"}
        blend_fields = {f.name for f in fields(BlendConfig)}
        unknown = sorted(set(overrides) - engine_fields - blend_fields - {"blend"})
        if unknown:
            raise UnknownOptionError(f"unknown engine option(s) {unknown}; known: {sorted(engine_fields | blend_fields)}")
        blend = overrides.pop("blend", self.blend)
        blend_overrides = {k: overrides.pop(k) for k in list(overrides) if k in blend_fields}
        if blend_overrides:
            blend = dataclasses.replace(blend, **blend_overrides)
        return dataclasses.replace(self, blend=blend, **overrides)

    @classmethod
    def from_kwargs(cls, base: Optional["EngineConfig"] = None, **overrides) -> "EngineConfig":
        """``base`` (default: defaults) with keyword overrides, as :meth:`replace`."""
        return (base if base is not None else cls()).replace(**overrides)
