"""Checks of values that cross the public boundary, in one place.

Every public entry point (``engine.generate/stream/prefill/warm``,
:class:`~kvboost_rag.decode.loop.SamplingParams`, :class:`~kvboost_rag.prompt.segments.Segment`,
chat rendering, corpus files, the CLI's argparse types) validates its arguments with these
helpers, so a bad value gets the same kind of error everywhere: a
:class:`~.errors.KVBoostError` subclass whose message says what was wrong and what is accepted.

Rules (documented behaviour, not guesses):

* an integer parameter takes an ``int`` (numpy integers too) or an integer-valued float
  (``3.0`` -> ``3``); ``bool`` is never a number here (``True`` is not a ratio or a count);
* a float parameter takes a finite real number (``nan`` / ``inf`` are refused) within its range;
* text must be ``str`` and valid Unicode: a lone surrogate (``"\\ud800"``, e.g. from
  ``bytes.decode(errors="surrogateescape")``) is refused, naming its position, rather than
  replaced, so the text warmed is always exactly the text a prompt later contains;
* a single ``str`` where a collection of texts is expected (``engine.warm("text")``) is refused
  instead of being iterated character by character; ``stop="abc"`` is one stop string.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping, Optional

from kvboost_rag.errors import EmptyInputError, InvalidConfigError, InvalidInputError

__all__ = ["integer", "real", "ratio", "timeout", "seed", "text", "stop_sequences", "texts_collection",
           "utf8", "CHAT_ROLES", "show"]

# Roles a chat message may have (the OpenAI / Hugging Face chat-template vocabulary).
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def show(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


# ------------------------------------------------------------------ numbers
def integer(name: str, value: Any, *, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int (an integer-valued float is accepted), ``>= minimum`` if given."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidConfigError(f"{name} must be an integer{' or None' if allow_none else ''}, "
                                 f"got {type(value).__name__} {show(value)}")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise InvalidConfigError(f"{name} must be a whole number, got {show(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def real(name: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
         exclusive_minimum: bool = False) -> float:
    """``value`` as a finite float within ``[minimum, maximum]`` (``(minimum, ...`` if exclusive)."""
    if minimum is not None and maximum is not None:
        span = f"within {'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        span = f"{'>' if exclusive_minimum else '>='} {minimum:g}"
    else:
        span = f"<= {maximum:g}" if maximum is not None else "finite"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidConfigError(f"{name} must be a number {span}, got {type(value).__name__} {show(value)}")
    value = float(value)
    too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
        raise InvalidConfigError(f"{name} must be a finite number {span}, got {value:g}")
    return value


def ratio(name: str, value: Any) -> float:
    """A share within [0, 1] (``True`` is not a ratio)."""
    return real(name, value, minimum=0.0, maximum=1.0)


def timeout(value: Any) -> Optional[float]:
    """None (no limit) or a finite number of seconds > 0."""
    if value is None:
        return None
    return real("timeout", value, minimum=0.0, exclusive_minimum=True)


def seed(value: Any) -> Optional[int]:
    """None or an integer in [0, 2**64) (what ``torch.Generator.manual_seed`` takes)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidConfigError(f"seed must be an int or None, got {type(value).__name__} {show(value)}")
    value = int(value)
    if not 0 <= value < 2 ** 64:
        raise InvalidConfigError(f"seed must be within [0, 2**64), got {value}")
    return value


# ------------------------------------------------------------------ text
def text(what: str, value: Any, *, allow_empty: bool = True) -> str:
    """A ``str`` that is valid Unicode (no lone surrogates)."""
    if not isinstance(value, str):
        hint = " (decode bytes first: data.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise InvalidInputError(f"{what} must be a str, got {type(value).__name__}{hint}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise InvalidInputError(
            f"{what} contains a lone surrogate U+{ord(bad):04X} at character {exc.start}, which is not valid "
            "Unicode; decode the source with errors='replace' (or fix the text) before passing it") from None
    if not allow_empty and not value.strip():
        raise EmptyInputError(f"{what} is empty")
    return value


def utf8(what: str, data: bytes) -> str:
    """``data`` decoded as UTF-8, or an error naming the first bad byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "a text file (UTF-8) is expected") from None


def byte_budget(name: str, value: Any) -> Optional[int]:
    """A store's byte budget: None (no limit) or an integer >= 0; ``"1GB"``, -1 or 1.5 are refused
    with how to write it. ``name`` says where it was given (``"open_store memory_bytes / MemoryStore
    max_bytes"``)."""
    try:
        return integer(name, value, minimum=0, allow_none=True)
    except InvalidConfigError as exc:
        raise InvalidConfigError(f"{exc}: a budget is a number of bytes, e.g. 1 << 30 for 1 GiB, "
                                 "or None for no limit") from None


def stop_sequences(stop: Any) -> tuple[str, ...]:
    """None -> (); a str -> that ONE stop string; an iterable of str -> a tuple of them. An empty
    stop string is refused: it matches before the first token, so the answer would always be empty."""
    if stop is None:
        return ()
    given = stop
    if isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, (bytes, bytearray, Mapping)) or not isinstance(stop, Iterable):
        raise InvalidInputError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    out = tuple(stop)
    for s in out:
        if not isinstance(s, str):
            raise InvalidInputError(f"stop must be a str or a list of str; it holds a {type(s).__name__} {show(s)}")
        if not s:
            raise InvalidInputError(f"stop={show(given)} "
                                    "holds an empty string, which would end every answer before its first token; "
                                    "drop it (stop=None for no stop sequence)")
        text("a stop string", s)
    return out


def texts_collection(what: str, value: Any, example: str) -> Any:
    """An iterable of texts / documents; a bare str, bytes or dict is refused (it would be iterated
    character by character, or key by key). ``example`` is how to call it right."""
    if isinstance(value, (str, bytes, bytearray)):
        raise InvalidInputError(
            f"{what} expects an iterable of documents, got a single {type(value).__name__} (it would be warmed "
            f"character by character); wrap one text in a list: {example}")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise InvalidInputError(
            f"{what} expects an iterable (list) of document texts, got {type(value).__name__}; e.g. {example}")
    return value
