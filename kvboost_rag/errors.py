"""Exceptions raised by kvboost-rag.

Every bad input gets one of these with a message that says what was wrong and what to do,
never silent garbage. They all derive from :class:`KVBoostError` so callers can catch one type.
"""
from __future__ import annotations


class KVBoostError(Exception):
    """Base class of every error raised by kvboost-rag."""


class UnsupportedModelError(KVBoostError):
    """The model's position scheme cannot be re-rotated (learned positions, ALiBi, sliding window...)."""


class ContextWindowError(KVBoostError, ValueError):
    """The assembled prompt (plus the tokens to generate) does not fit the model's context window."""


class EmptyInputError(KVBoostError, ValueError):
    """An empty prompt or an empty document was given."""


class InvalidConfigError(KVBoostError, ValueError):
    """A parameter is out of range (e.g. recompute_ratio outside [0, 1])."""


class UnknownOptionError(InvalidConfigError, TypeError):
    """An option name the callee does not know (a typo, an option of another version), e.g.
    ``KVBoostEngine(model, tokenizer, bogus=1)``. Also a TypeError, as for an unexpected keyword."""


class InvalidInputError(KVBoostError, ValueError, TypeError):
    """An input has the wrong type or form: a prompt that is neither text nor segments, a single
    str where a list of texts is expected, invalid Unicode, a malformed chat message, a file that
    is not text or a folder that is not a model. Also a TypeError, as a wrong type is one."""


class GenerationCancelled(KVBoostError):
    """A ``should_stop`` callable asked a prefill or decode to stop (checked between steps and
    before every decoder layer). :class:`~kvboost_rag.serve.streaming.TokenStream` turns it into its
    :class:`TimeoutError` when its deadline passed, or a quiet end after ``cancel()``."""


class StoreError(KVBoostError):
    """A KV store entry is unusable (corrupt, truncated, or written for another model)."""


class ModelMismatchError(StoreError):
    """A KV chunk was computed by a different model (fingerprint mismatch)."""


class CorruptEntryError(StoreError):
    """A stored entry failed its checksum or could not be parsed."""


class PackagedModelError(KVBoostError):
    """A packaged model cannot be provided (missing part, or parts that fail their checksum)."""


class PackagedModelNotInstalledError(PackagedModelError, FileNotFoundError):
    """A package holding (part of) a packaged model is not installed."""


class PackagedModelCorruptError(PackagedModelError):
    """The installed parts do not assemble into the pinned file (size or sha256 differ)."""


class StructuredOutputError(KVBoostError):
    """Constrained decoding could not produce a complete value: ``max_new_tokens`` ran out before
    the JSON was complete, the grammar library is missing, or it cannot read the tokenizer."""


class ToolsNotSupportedError(KVBoostError, ValueError):
    """Tools were passed but the model's chat template has no tool support (it would ignore them).
    Also a ValueError, as frameworks raise for a model that cannot call tools."""


class SchedulerFullError(KVBoostError):
    """Too many requests are waiting for the engine's batch scheduler (``EngineConfig.max_waiting``);
    retry later or raise the limit."""
