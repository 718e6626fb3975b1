"""Checks of values that cross the public boundary, in one place.

Every public entry point (``engine.generate/stream/prefill/warm``, :class:`~.generate.SamplingParams`,
:class:`~.segments.Segment`, chat rendering, corpus files, the CLI's argparse types) validates its
arguments with these helpers, so a bad value gets the same kind of error everywhere: a
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

from .errors import InvalidConfigError, InvalidInputError

__all__ = ["integer", "real", "ratio", "timeout", "seed", "text", "stop_sequences", "texts_collection",
           "prompt_type", "utf8", "CHAT_ROLES", "chat_messages"]

# Roles a chat message may have (the OpenAI / Hugging Face chat-template vocabulary).
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def _show(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


# ------------------------------------------------------------------ numbers
def integer(name: str, value: Any, *, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int (an integer-valued float is accepted), ``>= minimum`` if given."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidConfigError(f"{name} must be an integer{' or None' if allow_none else ''}, "
                                 f"got {type(value).__name__} {_show(value)}")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise InvalidConfigError(f"{name} must be a whole number, got {_show(value)}")
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
        raise InvalidConfigError(f"{name} must be a number {span}, got {type(value).__name__} {_show(value)}")
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
        raise InvalidConfigError(f"seed must be an int or None, got {type(value).__name__} {_show(value)}")
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
        from .errors import EmptyInputError
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


def stop_sequences(stop: Any) -> tuple[str, ...]:
    """None -> (); a str -> that ONE stop string; an iterable of str -> a tuple of them."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (text("stop", stop),) if stop else ()
    if isinstance(stop, (bytes, bytearray, Mapping)) or not isinstance(stop, Iterable):
        raise InvalidInputError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    out = tuple(stop)
    for s in out:
        if not isinstance(s, str):
            raise InvalidInputError(f"stop must be a str or a list of str; it holds a {type(s).__name__} {_show(s)}")
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


def prompt_type(prompt: Any) -> None:
    """The prompt's container type: a str, a :class:`Segment`, or a list/tuple of Segment / str."""
    from .segments import Segment

    if isinstance(prompt, (str, Segment)):
        return
    if not isinstance(prompt, (list, tuple)):
        raise InvalidInputError(
            f"a prompt must be a str, a Segment, or a list of Segment / str; got {type(prompt).__name__}"
            + (" (decode bytes first)" if isinstance(prompt, (bytes, bytearray)) else ""))
    for i, part in enumerate(prompt):
        if not isinstance(part, (str, Segment)):
            raise InvalidInputError(
                f"prompt part {i} is a {type(part).__name__} {_show(part)}; each part must be a Segment or a str")


# ------------------------------------------------------------------ chat
def chat_messages(messages: Any) -> list[dict]:
    """Check chat messages and return them as ``[{"role": str, "content": str | list}]``.

    Each message is a dict with a ``role`` in :data:`CHAT_ROLES` and a ``content`` that is a str,
    a list of str / Segment, or None / absent (taken as "")."""
    from .segments import Segment

    if isinstance(messages, (str, bytes, bytearray, Mapping)) or not isinstance(messages, Iterable):
        raise InvalidInputError(
            f"chat messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"chat message {i} must be a dict with 'role' and 'content', "
                                    f"got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise InvalidInputError(f"chat message {i} has no 'role'; give one of {', '.join(CHAT_ROLES)}")
        if role not in CHAT_ROLES:
            raise InvalidInputError(f"chat message {i} has role {_show(role)}; accepted roles: {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": text(f"chat message {i}'s content", content or "")})
            continue
        if isinstance(content, (bytes, bytearray, Mapping)) or not isinstance(content, Iterable):
            raise InvalidInputError(f"chat message {i}'s content must be a str or a list of str / Segment, "
                                    f"got {type(content).__name__}")
        parts = list(content)
        for part in parts:
            if not isinstance(part, (str, Segment)):
                raise InvalidInputError(f"chat message {i}'s content holds a {type(part).__name__} "
                                        f"{_show(part)}; parts must be str or Segment")
            if isinstance(part, str):
                text(f"chat message {i}'s content", part)
        out.append({"role": role, "content": parts})
    return out
