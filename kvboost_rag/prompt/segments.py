"""Split a prompt into text and document segments, and tokenize it segment by segment.

Why segment-wise tokenization: a document's ids at query time must be exactly the ids it was
encoded with at warm time, whatever text surrounds it. Tokenizing each segment alone and
concatenating guarantees that (a BPE merge across a segment boundary would otherwise change
the document's first or last tokens and the stored KV would no longer match).

Documents reach the engine two ways:
- explicitly, as :class:`Segment` objects of kind ``"document"`` (preferred);
- automatically: :class:`DocumentDetector` finds warmed document texts verbatim inside a flat
  prompt (anchor lookup over every offset, then a full-text check), so stock chains that paste
  documents into a template still get reuse.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence, Union

from kvboost_rag import validate
from kvboost_rag.errors import EmptyInputError, InvalidInputError

SegmentKind = Literal["text", "document"]
SEGMENT_KINDS = ("text", "document")


@dataclass(frozen=True)
class Segment:
    """A piece of a prompt: plain text (always computed) or a document (KV reused if stored)."""

    kind: SegmentKind
    text: str

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise InvalidInputError(f"Segment kind must be one of {SEGMENT_KINDS}, got {self.kind!r}")
        validate.text(f"a {self.kind} segment's text", self.__dict__["text"])

    @classmethod
    def text_(cls, text: str) -> "Segment":
        return cls("text", text)

    @classmethod
    def document(cls, text: str) -> "Segment":
        return cls("document", text)

    @property
    def is_document(self) -> bool:
        return self.kind == "document"


class _TextConstructor:
    """``Segment.text("...")`` builds a text segment; ``segment.text`` is the field.

    A non-data descriptor: the instance's own ``text`` attribute wins over it, the class
    attribute lookup gets the constructor."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return objtype.text_
        return obj.__dict__["text"]


Segment.text = _TextConstructor()  # type: ignore[assignment]


Prompt = Union[str, Segment, Sequence[Union[Segment, str]]]


def normalize_segments(prompt: Prompt, detector: "DocumentDetector | None" = None) -> list[Segment]:
    """Turn a flat string (auto-detect documents), a Segment, or a list of segments/strings into
    segments; anything else (bytes, dict, numbers...) is an :class:`InvalidInputError`."""
    check_prompt_type(prompt)
    if isinstance(prompt, str):
        if not prompt:
            raise EmptyInputError("The prompt is empty.")
        validate.text("the prompt", prompt)
        return detector.split(prompt) if detector is not None else [Segment("text", prompt)]
    segments: list[Segment] = []
    for part in ([prompt] if isinstance(prompt, Segment) else prompt):
        seg = part if isinstance(part, Segment) else Segment("text", part)
        if seg.is_document and not seg.text.strip():
            raise EmptyInputError("A document segment is empty; drop it or give it text.")
        if not seg.text:
            continue
        # Warmed documents pasted into text segments are found there too.
        segments.extend(detector.split(seg.text) if detector is not None and not seg.is_document else [seg])
    if not segments:
        raise EmptyInputError("The prompt is empty.")
    return segments


class DocumentDetector:
    """Finds warmed document texts verbatim inside flat prompts.

    Each registered text is indexed by its first ``anchor`` characters (shorter texts by their
    whole text). Scanning a prompt looks up the substring at every offset for each distinct
    anchor length (a dict lookup per offset: the hash of the slice plays the rolling hash),
    confirms candidates with a full comparison, prefers the longest match, and skips past it.
    """

    def __init__(self, anchor: int = 64, min_length: int = 16) -> None:
        self.anchor = anchor
        self.min_length = min_length
        self._by_anchor: dict[str, list[str]] = {}
        self._lengths: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_anchor.values())

    def register(self, text: str) -> None:
        if len(text) < self.min_length:
            return
        n = min(self.anchor, len(text))
        with self._lock:
            bucket = self._by_anchor.setdefault(text[:n], [])
            if text not in bucket:
                bucket.append(text)
                bucket.sort(key=len, reverse=True)
            self._lengths.add(n)

    def register_many(self, texts: Iterable[str]) -> None:
        for t in texts:
            self.register(t)

    def __contains__(self, text: str) -> bool:
        n = min(self.anchor, len(text))
        return text in self._by_anchor.get(text[:n], ())

    def split(self, prompt: str) -> list[Segment]:
        """Segments of ``prompt``: warmed documents found verbatim, text in between."""
        with self._lock:
            lengths = sorted(self._lengths, reverse=True)
            index = self._by_anchor
        segments: list[Segment] = []
        text_start = 0
        i = 0
        end = len(prompt)
        while i < end and lengths:
            match = None
            for n in lengths:
                if i + n > end:
                    continue
                for cand in index.get(prompt[i:i + n], ()):
                    if prompt.startswith(cand, i) and (match is None or len(cand) > len(match)):
                        match = cand
                        break
            if match is None:
                i += 1
                continue
            if i > text_start:
                segments.append(Segment("text", prompt[text_start:i]))
            segments.append(Segment("document", match))
            i += len(match)
            text_start = i
        if text_start < end:
            segments.append(Segment("text", prompt[text_start:]))
        return segments


@dataclass
class TokenizedPrompt:
    """Token ids of a prompt plus where its document segments sit."""

    input_ids: list[int]
    documents: list[tuple[int, int, "Segment"]]  # (start, end) token span and the segment

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` alone, without special tokens (the same call at warm and query time)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def leading_special_ids(tokenizer) -> list[int]:
    """The special ids the tokenizer puts in front of a text by default (e.g. BOS), if any."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if len(with_special) > len(without) and with_special[-len(without):] == without:
        return with_special[: len(with_special) - len(without)]
    return []


def tokenize_segments(tokenizer, segments: Sequence[Segment], tokenize_document) -> TokenizedPrompt:
    """Tokenize segment by segment; ``tokenize_document`` gives a document's (cached) ids.

    The tokenizer's default leading special ids (BOS) are prepended once unless the rendered
    prompt already starts with them (chat templates usually write BOS themselves).
    """
    ids: list[int] = []
    docs: list[tuple[int, int, Segment]] = []
    for seg in segments:
        seg_ids = tokenize_document(seg.text) if seg.is_document else tokenize_text(tokenizer, seg.text)
        if seg.is_document:
            docs.append((len(ids), len(ids) + len(seg_ids), seg))
        ids.extend(seg_ids)
    lead = leading_special_ids(tokenizer)
    if lead and ids[: len(lead)] != lead:
        ids = lead + ids
        docs = [(s + len(lead), e + len(lead), seg) for s, e, seg in docs]
    if not ids:
        raise EmptyInputError("The prompt has no tokens.")
    return TokenizedPrompt(ids, docs)


def check_prompt(prompt: Any) -> None:
    """:func:`check_prompt_type`, and a prompt that is empty or only whitespace (with no document
    segment) is an :class:`EmptyInputError`: there is nothing to answer."""
    check_prompt_type(prompt)
    parts = [prompt] if isinstance(prompt, (str, Segment)) else list(prompt)
    if any(isinstance(p, Segment) and p.is_document for p in parts):
        return
    if not any((p.text if isinstance(p, Segment) else p).strip() for p in parts):
        raise EmptyInputError(f"The prompt is empty or only whitespace ({validate.show(prompt)}); "
                              "there is nothing to answer. Give it text or a document segment.")


def check_prompt_type(prompt: Any) -> None:
    """The prompt's container type: a str, a :class:`Segment`, or a list/tuple of Segment / str."""
    if isinstance(prompt, (str, Segment)):
        return
    if not isinstance(prompt, (list, tuple)):
        raise InvalidInputError(
            f"a prompt must be a str, a Segment, or a list of Segment / str; got {type(prompt).__name__}"
            + (" (decode bytes first)" if isinstance(prompt, (bytes, bytearray)) else ""))
    for i, part in enumerate(prompt):
        if not isinstance(part, (str, Segment)):
            raise InvalidInputError(
                f"prompt part {i} is a {type(part).__name__} {validate.show(part)}; each part must be a Segment or a str")
