"""Constrained decoding: answers that always parse as JSON (and match a JSON schema).

Why in the core: framework features (``with_structured_output``, JSON mode, forced tool calls)
need output that parses every time, and asking a small model nicely is not enough. The decode
loop (:func:`kvboost_rag.decode.loop.decode`) masks the logits of every step, the first one (from
the prefill) included, so that only tokens the grammar allows can be picked; EOS is allowed only
where the grammar may end. The engine is `outlines-core <https://github.com/dottxt-ai/outlines-core>`_
(Rust, no dependencies): it turns the JSON schema into a regular expression
(:mod:`kvboost_rag.decode.json_schema`, which fixes the layout and integer bounds) and the regular
expression plus the tokenizer's vocabulary into an index (DFA state -> allowed tokens); we do not
write our own. It is an optional dependency: ``pip install 'kvboost-rag[structured]'``.

What this module adds to the regular expression, so that every answer parses:

* special tokens other than EOS are not in the vocabulary given to the index (they would vanish
  when the text is decoded with ``skip_special_tokens`` and the text would not be what the grammar
  accepted);
* the output ends as soon as the grammar is complete and nothing but EOS may follow (no extra
  model call); if ``max_new_tokens`` runs out before that, :class:`StructuredOutputError` is raised
  rather than returning text that does not parse.

Tokens are given to outlines-core as the bytes they decode to (byte-level BPE through GPT-2's
byte table, SentencePiece ``\u2581`` / ``<0xNN>``, anything else as its text), so tokens holding
part of a UTF-8 character work. The vocabulary and the compiled index are cached per tokenizer
and schema (:func:`_index_for`, an LRU of :data:`INDEX_CACHE_SIZE`): building the index is the
slow part, done once per schema and vocabulary, and it grows with the vocabulary's size.

API: :func:`json_schema_constraint`, :func:`json_object_constraint`; pass the result as
``engine.generate(..., constraint=c)`` / ``engine.stream(..., constraint=c)``. The parsed value is
in ``result.extra["json"]``.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch

from kvboost_rag.decode.json_schema import INSTALL_HINT, schema_regex
from kvboost_rag.errors import InvalidInputError, StructuredOutputError

__all__ = ["Constraint", "ConstraintState", "json_schema_constraint", "json_object_constraint", "as_constraint",
           "parse_constrained", "schema_regex"]

#: Compiled indexes kept (per tokenizer, vocabulary size, EOS set and schema), least recently used out.
INDEX_CACHE_SIZE = 8


@dataclass(frozen=True)
class Constraint:
    """What the output must be: JSON matching ``schema`` (a JSON schema, as a canonical JSON string).

    Immutable and tokenizer-free; :meth:`start` binds it to a tokenizer for one answer."""

    schema_json: str
    description: str = "JSON"

    @property
    def schema(self) -> dict:
        return json.loads(self.schema_json)

    @property
    def regex(self) -> str:
        """The regular expression the output must match (what the index is built from)."""
        return schema_regex(self.schema_json)

    def start(self, tokenizer, vocab_size: int, eos_ids: Iterable[int]) -> "ConstraintState":
        """A fresh matcher for one answer over ``vocab_size`` logits (the model's, which may exceed
        the tokenizer's)."""
        eos = tuple(sorted(int(e) for e in eos_ids))
        index = _index_for(tokenizer, int(vocab_size), eos, self.schema_json)
        import outlines_core

        return ConstraintState(outlines_core.Guide(index), int(vocab_size), eos, self.description)


def json_schema_constraint(schema: Any) -> Constraint:
    """Output must be JSON valid against ``schema``: a JSON-schema dict, its JSON text, or a
    pydantic model class (its ``model_json_schema()``). Properties the schema does not declare
    are not generated (strict mode)."""
    if isinstance(schema, Constraint):
        return schema
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        name = schema.__name__
        schema = schema.model_json_schema()
    else:
        name = None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidInputError(f"the JSON schema text does not parse: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidInputError(f"a JSON schema must be a dict, its JSON text or a pydantic model class, "
                                f"got {type(schema).__name__}")
    try:
        text = json.dumps(schema, ensure_ascii=False)  # key order kept: properties are generated in it
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"the JSON schema is not JSON-serializable: {exc}") from None
    return Constraint(text, f"JSON matching schema {name or schema.get('title') or ''}".rstrip())


def json_object_constraint() -> Constraint:
    """JSON mode: output must be one JSON object (any keys and values, nested up to
    :data:`~kvboost_rag.decode.json_schema.ANY_OBJECT_DEPTH` levels)."""
    return Constraint(json.dumps({"type": "object"}), "a JSON object")


def as_constraint(value: Any) -> Optional[Constraint]:
    """None, a :class:`Constraint`, or a schema (dict / pydantic class) taken as a schema constraint."""
    if value is None or isinstance(value, Constraint):
        return value
    if isinstance(value, dict) or (isinstance(value, type) and hasattr(value, "model_json_schema")):
        return json_schema_constraint(value)
    raise InvalidInputError(f"constraint must be built with json_schema_constraint(schema) or "
                            f"json_object_constraint() (or be a JSON-schema dict); got {type(value).__name__}")


class ConstraintState:
    """One answer's grammar position: masks logits, advances on each token, says when it is done."""

    def __init__(self, guide, vocab_size: int, eos_ids: tuple[int, ...], description: str) -> None:
        self.guide = guide
        self.vocab_size = vocab_size
        self.eos = [e for e in eos_ids if 0 <= e < vocab_size]
        self.description = description
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> torch.Tensor:
        """``[vocab]`` bool: the tokens the grammar accepts next (EOS only where it may end)."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> np.ndarray:
        self._bitmask[:] = 0
        self.guide.write_mask_into(self._bitmask.ctypes.data, self._bitmask.size, 4)
        # Packed little-endian int32 words -> one bool per id, in numpy: one single-threaded pass,
        # where torch's shift-and-mask runs on intra-op threads that contend with busy cores.
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.vocab_size].view(np.bool_)
        if self.eos:  # the index knows one EOS id; every EOS of the model ends the answer the same way
            bits[self.eos] = self.guide.is_finished()
        if not bits.any():
            raise StructuredOutputError(f"no token of this vocabulary can continue {self.description}; "
                                        "the tokenizer cannot spell JSON (a word-level vocabulary?)")
        return bits

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every forbidden token at -inf (a new float tensor)."""
        blocked = ~self._allowed()
        if logits.device.type == "cpu":  # numpy: single-threaded, no intra-op thread contention
            return torch.from_numpy(np.where(blocked, np.float32(-np.inf), logits.detach().float().numpy()))
        return logits.float().masked_fill(torch.from_numpy(blocked).to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        try:
            self.guide.advance(int(token), return_tokens=False)
        except Exception as exc:  # cannot happen after mask(): a bug if it does
            raise StructuredOutputError(f"token {token} was picked but the grammar for {self.description} "
                                        f"refuses it: {exc}") from None

    def finished(self, eos_ids: Iterable[int] = ()) -> bool:
        """True once the output is complete and nothing but EOS may follow."""
        if not self.guide.is_finished():
            return False
        allowed = self._allowed()
        allowed[[e for e in {*self.eos, *eos_ids} if 0 <= e < self.vocab_size]] = False
        return not allowed.any()

    @property
    def complete(self) -> bool:
        """The output so far is a whole value of the grammar (more may still be allowed)."""
        return bool(self.guide.is_finished())


# ------------------------------------------------------------------------------ vocabulary
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token strings use it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _vocab_style(tokenizer) -> str:
    """"byte-level" (GPT-2 style), "sentencepiece" (▁ for spaces, <0xNN> byte fallback) or "raw"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            decoder = json.loads(backend.to_str()).get("decoder") or {}
        except Exception:
            decoder = {}
        text = json.dumps(decoder)
        if '"ByteLevel"' in text:
            return "byte-level"
        if '"ByteFallback"' in text or '"Metaspace"' in text or "\u2581" in text:
            return "sentencepiece"
        return "raw"
    if getattr(tokenizer, "byte_decoder", None) is not None:  # slow GPT-2 style tokenizers
        return "byte-level"
    if getattr(tokenizer, "sp_model", None) is not None:
        return "sentencepiece"
    return "raw"


def _token_bytes(token: str, style: str) -> bytes:
    if style == "byte-level":
        try:
            return bytes(_BYTE_DECODER[c] for c in token)
        except KeyError:  # an added token, stored as plain text
            return token.encode("utf-8")
    if style == "sentencepiece":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace("\u2581", " ").encode("utf-8")
    return token.encode("utf-8")


def _special_ids(tokenizer) -> set[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                   if getattr(t, "special", False))
    return special


def _vocabulary(tokenizer, vocab_size: int, eos: tuple[int, ...]):
    """outlines-core ``Vocabulary`` of ``tokenizer``: every token as the bytes it decodes to, ids
    below ``vocab_size``, special tokens left out, the first EOS as the index's EOS."""
    import outlines_core

    try:
        vocab = tokenizer.get_vocab()
        style = _vocab_style(tokenizer)
    except Exception as exc:
        raise StructuredOutputError(f"cannot read the vocabulary of {type(tokenizer).__name__} "
                                    f"{getattr(tokenizer, 'name_or_path', '')!r} for constrained decoding: "
                                    f"{exc}") from None
    skip = _special_ids(tokenizer) | set(eos)
    added = {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    table: dict[bytes, list[int]] = {}
    for token, i in vocab.items():
        if not isinstance(i, int) or i < 0 or i >= vocab_size or i in skip or not token:
            continue
        data = token.encode("utf-8") if i in added else _token_bytes(token, style)
        if data:
            table.setdefault(data, []).append(i)
    if not table or not eos:
        raise StructuredOutputError(f"cannot use the vocabulary of {type(tokenizer).__name__} "
                                    f"{getattr(tokenizer, 'name_or_path', '')!r} for constrained decoding "
                                    f"({'no tokens' if not table else 'no EOS token'})")
    return outlines_core.Vocabulary(eos[0], table)


# Vocabularies per tokenizer (weak: they go with the tokenizer) and an LRU of compiled indexes.
_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INDEXES: "OrderedDict[tuple, Any]" = OrderedDict()
_BUILDING: dict[tuple, threading.Lock] = {}
_LOCK = threading.Lock()


class _VocabEntry:
    """One tokenizer's vocabulary for one (vocabulary size, EOS set); a hashable identity for keys."""

    __slots__ = ("vocabulary", "__weakref__")

    def __init__(self, vocabulary) -> None:
        self.vocabulary = vocabulary


def _index_for(tokenizer, vocab_size: int, eos: tuple[int, ...], schema_json: str):
    """The compiled outlines-core ``Index`` of ``schema_json`` over ``tokenizer`` (cached)."""
    try:
        import outlines_core
    except ImportError:
        raise StructuredOutputError(INSTALL_HINT) from None
    regex = schema_regex(schema_json)  # cheap; raises InvalidInputError for a bad schema
    with _LOCK:
        try:
            per_tok = _VOCABS.setdefault(tokenizer, {})
        except TypeError:
            raise StructuredOutputError(f"cannot read the vocabulary of {type(tokenizer).__name__} for "
                                        "constrained decoding (not a weak-referenceable tokenizer)") from None
        entry = per_tok.get((vocab_size, eos))
        if entry is None:
            entry = per_tok[(vocab_size, eos)] = _VocabEntry(_vocabulary(tokenizer, vocab_size, eos))
        key = (entry, regex)
        build_lock = _BUILDING.setdefault(key, threading.Lock())
    with build_lock:  # one build per key; other keys build in parallel
        with _LOCK:
            index = _INDEXES.get(key)
            if index is not None:
                _INDEXES.move_to_end(key)
                _BUILDING.pop(key, None)
                return index
        try:
            index = outlines_core.Index(regex, entry.vocabulary)
        except Exception as exc:  # no token sequence can match: the vocabulary cannot spell it
            with _LOCK:
                _BUILDING.pop(key, None)
            reason = str(exc).replace(f"'{regex}'", "(the schema's pattern)")
            raise StructuredOutputError(
                f"the vocabulary of {type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r} "
                f"cannot spell JSON for this constraint: {reason[:500]}") from None
        with _LOCK:
            _INDEXES[key] = index
            while len(_INDEXES) > INDEX_CACHE_SIZE:
                _INDEXES.popitem(last=False)
            _BUILDING.pop(key, None)
        return index


def parse_constrained(text: str, constraint: Constraint) -> Any:
    """The value of a constrained answer. It parses by construction; if it does not (a tokenizer
    whose decode does not round-trip), say so instead of handing on broken text."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StructuredOutputError(f"the constrained output does not parse as {constraint.description}: {exc}; "
                                    f"text: {text[:200]!r}") from None
