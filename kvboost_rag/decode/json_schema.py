"""JSON schema -> the regular expression a constrained answer must match.

outlines-core (:mod:`outlines_core.json_schema`) writes the regular expression; this module fixes
what it leaves open so that a small model always terminates and ``json.loads`` accepts the text:

* one fixed layout, ``json.dumps``'s default (``", "`` and ``": "`` separators, no other
  whitespace): a weak model cannot spin on whitespace forever;
* integer ``minimum`` / ``maximum`` (and the exclusive forms) become a digit pattern here, since
  outlines-core ignores them: a random model cannot write digits forever;
* an object with any members (JSON mode) is our own pattern, nested :data:`ANY_OBJECT_DEPTH`
  levels, because outlines-core's any-object pattern is far slower to compile into an index;
* control characters cannot appear raw inside strings (outlines' string pattern excludes
  U+0000-U+001F and U+007F-U+009F), so ``json.loads`` in its default strict mode accepts every
  answer.

The vocabulary, the compiled index and the matcher are :mod:`kvboost_rag.decode.constraints`.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any, Optional

from kvboost_rag.errors import InvalidInputError, StructuredOutputError

__all__ = ["schema_regex", "ITEM_SEPARATOR", "KEY_SEPARATOR", "MAX_DEPTH", "ANY_OBJECT_DEPTH", "INSTALL_HINT"]

INSTALL_HINT = ("constrained decoding needs outlines-core: pip install 'kvboost-rag[structured]' "
                "(or 'outlines-core>=0.2.14,<0.3')")

#: The one layout allowed (``json.dumps``'s default): ``", "`` between items, ``": "`` after keys,
#: no other whitespace. A fixed layout leaves a weak model no whitespace to spin on; optional
#: spaces after ``{`` / ``[`` let a small model repeat array items until its token budget runs out.
ITEM_SEPARATOR, KEY_SEPARATOR = ", ", ": "
_WS_MARK = "KVBWSMARK"  # the whitespace pattern given to outlines-core, replaced by the layout above
#: Nesting depth of outlines-core's any-value grammar (``$ref`` recursion, values without a type).
MAX_DEPTH = 3
#: Levels of an object with any members (JSON mode): 2 = its values may be objects / arrays of scalars.
ANY_OBJECT_DEPTH = 2


@functools.lru_cache(maxsize=64)
def schema_regex(schema_json: str) -> str:
    """The regular expression of a JSON schema (outlines-core's, with the fixed layout, integer
    ranges and our any-object pattern; raises :class:`InvalidInputError` for a schema it cannot express)."""
    try:
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        raise StructuredOutputError(INSTALL_HINT) from None
    schema = json.loads(schema_json)
    patterns: dict[str, str] = {}
    schema = _replace_nodes(schema, patterns)
    try:
        regex = build_regex_from_schema(json.dumps(schema), _WS_MARK, MAX_DEPTH)
    except Exception as exc:  # ValueError with a reason ("Unsupported type: ...")
        raise InvalidInputError(f"cannot build a grammar for this JSON schema: {exc}") from None
    # The mark stands wherever JSON allows whitespace: after { [ : , and before : , } ].
    regex = (regex.replace("," + _WS_MARK, ITEM_SEPARATOR).replace(":" + _WS_MARK, KEY_SEPARATOR)
             .replace(_WS_MARK, ""))
    for placeholder, pattern in patterns.items():
        regex = regex.replace(f'"{placeholder}"', f"({pattern})")
    return regex


_DATA_KEYS = {"enum", "const", "default", "examples", "example"}
_OBJECT_STRUCTURE = {"properties", "patternProperties", "required", "allOf", "anyOf", "oneOf", "$ref", "enum", "const"}


def _replace_nodes(node: Any, patterns: dict[str, str]) -> Any:
    """A copy of ``node`` where the schemas outlines-core handles badly are ``const`` placeholders,
    their patterns in ``patterns``: bounded integers (outlines-core 0.2 ignores minimum / maximum)
    and objects with any members (its any-object pattern is far slower to compile into an index
    than ours, nested :data:`ANY_OBJECT_DEPTH` levels)."""
    if isinstance(node, list):
        return [_replace_nodes(v, patterns) for v in node]
    if not isinstance(node, dict):
        return node
    pattern = None
    if node.get("type") == "integer" and any(k in node for k in
                                              ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        pattern = _int_range_regex(*_int_bounds(node))
    elif (node.get("type") == "object" and not _OBJECT_STRUCTURE & node.keys()
          and node.get("additionalProperties", True) is True):
        pattern = _any_object_regex(ANY_OBJECT_DEPTH)
    if pattern is not None:
        placeholder = f"KVBPATTERN{len(patterns)}Q"
        patterns[placeholder] = pattern
        return {"const": placeholder}
    return {k: (v if k in _DATA_KEYS else _replace_nodes(v, patterns)) for k, v in node.items()}


def _any_object_regex(depth: int) -> str:
    """A JSON object whose values are scalars or, ``depth - 1`` levels deep, objects and arrays."""
    from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING

    scalar = f"{STRING}|{NUMBER}|{BOOLEAN}|{NULL}"

    def obj(v: str) -> str:
        member = f"{STRING}{KEY_SEPARATOR}({v})"
        return rf"\{{({member}({ITEM_SEPARATOR}{member})*)?\}}"

    def arr(v: str) -> str:
        return rf"\[(({v})({ITEM_SEPARATOR}({v}))*)?\]"

    value = scalar
    for _ in range(depth - 1):
        value = f"{scalar}|{obj(value)}|{arr(value)}"
    return obj(value)


def _int_bounds(node: dict) -> tuple[Optional[int], Optional[int]]:
    def num(key):
        v = node.get(key)
        if v is None or isinstance(v, bool):
            return None
        if not isinstance(v, (int, float)):
            raise InvalidInputError(f"integer schema {key} must be a number, got {v!r}")
        return v

    lo = hi = None
    if num("minimum") is not None:
        lo = math.ceil(num("minimum"))
        if node.get("exclusiveMinimum") is True and lo == num("minimum"):  # draft 4 form
            lo += 1
    if num("exclusiveMinimum") is not None:
        x = math.floor(num("exclusiveMinimum")) + 1
        lo = x if lo is None else max(lo, x)
    if num("maximum") is not None:
        hi = math.floor(num("maximum"))
        if node.get("exclusiveMaximum") is True and hi == num("maximum"):
            hi -= 1
    if num("exclusiveMaximum") is not None:
        x = math.ceil(num("exclusiveMaximum")) - 1
        hi = x if hi is None else min(hi, x)
    if lo is not None and hi is not None and lo > hi:
        raise InvalidInputError(f"integer schema allows no value: minimum {lo} > maximum {hi}")
    return lo, hi


def _same_length(lo: str, hi: str) -> str:
    """Pattern for the decimal strings of one length from ``lo`` to ``hi`` (inclusive)."""
    n = len(lo)
    if lo == hi:
        return lo
    if lo == "0" * n and hi == "9" * n:
        return f"[0-9]{{{n}}}" if n > 1 else "[0-9]"
    if n == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return lo[0] + _same_length(lo[1:], hi[1:])
    parts = [lo[0] + _same_length(lo[1:], "9" * (n - 1))]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{{{n - 1}}}")
    parts.append(hi[0] + _same_length("0" * (n - 1), hi[1:]))
    return "(" + "|".join(parts) + ")"


def _nonneg_range(lo: int, hi: Optional[int]) -> str:
    """Canonical decimals (no leading zero) from ``lo`` >= 0 to ``hi`` (None: unbounded)."""
    parts = []
    top = len(str(hi)) if hi is not None else len(str(lo))
    for n in range(len(str(lo)), top + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = 10 ** n - 1 if hi is None else min(hi, 10 ** n - 1)
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    if hi is None:
        parts.append(f"[1-9][0-9]{{{len(str(lo))},}}")
    return "|".join(parts)


def _int_range_regex(lo: Optional[int], hi: Optional[int]) -> str:
    """Pattern for the JSON integers in ``[lo, hi]`` (either bound may be None)."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_nonneg_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        parts.append("-(" + _nonneg_range(max(1, -hi) if hi is not None and hi < 0 else 1,
                                          -lo if lo is not None else None) + ")")
    return "|".join(f"({p})" for p in parts)
