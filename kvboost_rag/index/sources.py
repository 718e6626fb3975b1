"""Turn whatever the user has into rendered document texts for warming.

The KV of a document is only reused when the text warmed is *exactly* the text the chain later
inserts into the prompt, so every source goes through a ``render`` callable that produces that
text. Defaults follow what stock chains insert:

* ``str``: the string itself;
* LangChain ``Document`` (anything with ``.page_content``): ``page_content`` (what the default
  ``document_prompt`` ``"{page_content}"`` renders); use :func:`langchain_render` for another prompt;
* LlamaIndex nodes / Documents (anything with ``.get_content``):
  ``node.get_content(metadata_mode=MetadataMode.LLM)``, what LlamaIndex's synthesizers insert;
* a JSONL file of ``{"id": ..., "text": ...}`` lines (``render`` receives the whole record dict),
  decoded line by line: a line that is not UTF-8, not JSON, not an object, or whose ``"text"`` is
  not a string (null, a number, a list...) is a failed document in the warm report, and the other
  lines are warmed;
* a folder: every ``*.txt`` / ``*.md`` file below it, read as UTF-8, id = relative path.

Text that is not valid Unicode (a lone surrogate) is a failed document too, never warmed.
Objects are duck-typed; no framework is imported at module level (only inside the LangChain /
LlamaIndex helpers, when called).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional

from kvboost_rag import validate
from kvboost_rag.errors import KVBoostError

Render = Callable[[Any], str]
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class CorpusDoc:
    """One document to warm. ``error`` is set (and ``text`` empty) when it could not be loaded
    or rendered; the warm job reports it as failed with that reason instead of stopping."""

    id: str
    text: str
    source: str
    error: Optional[str] = None


class CorpusError(KVBoostError, ValueError):
    """The corpus argument itself is unusable (missing path, unsupported type)."""


# ---------------------------------------------------------------- renderers
def page_content(doc: Any) -> str:
    """LangChain default: the document's ``page_content``."""
    return doc.page_content


def llamaindex_llm(node: Any) -> str:
    """LlamaIndex default: ``node.get_content(metadata_mode=MetadataMode.LLM)`` (metadata the node
    does not exclude for the LLM, then the text: exactly what the synthesizer inserts)."""
    try:
        from llama_index.core.schema import MetadataMode

        mode: Any = MetadataMode.LLM
    except ImportError:  # duck-typed node without llama_index installed
        mode = "llm"
    return node.get_content(metadata_mode=mode)


def langchain_render(document_prompt: Any = None, document_separator: str = "") -> Render:
    """Render LangChain Documents as a ``create_stuff_documents_chain``-style chain inserts them.

    ``document_prompt``: a ``PromptTemplate`` or a template string (e.g. ``"{source}: {page_content}"``);
    None -> ``page_content``. ``document_separator`` is prepended when the chain puts its separator
    in front of each document (see DESIGN: separators go at the front of a segment)."""
    if document_prompt is None:
        return lambda doc: document_separator + doc.page_content
    from langchain_core.prompts import PromptTemplate, format_document

    prompt = PromptTemplate.from_template(document_prompt) if isinstance(document_prompt, str) else document_prompt
    return lambda doc: document_separator + format_document(doc, prompt)


def template_render(template: str) -> Render:
    """Generic ``str.format`` renderer: ``{text}`` (also ``{page_content}``) and metadata fields,
    for any source kind."""

    def render(obj: Any) -> str:
        if isinstance(obj, str):
            return template.format(text=obj, page_content=obj)
        if isinstance(obj, dict):
            fields = dict(obj.get("metadata") or {}, **obj)
            fields.setdefault("page_content", fields.get("text", ""))
            return template.format(**fields)
        text = _default_text(obj)
        meta = dict(getattr(obj, "metadata", None) or {})
        return template.format(**{**meta, "text": text, "page_content": text})

    return render


def _default_text(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        if "text" not in obj:
            raise ValueError(f"record has no 'text' field (keys: {sorted(obj)})")
        if not isinstance(obj["text"], str):
            raise TypeError(f"'text' is {json.dumps(obj['text'])[:40] if _jsonable(obj['text']) else type(obj['text']).__name__} "
                            f"({type(obj['text']).__name__}); it must be a string")
        return obj["text"]
    if hasattr(obj, "page_content"):
        return page_content(obj)
    if hasattr(obj, "get_content"):
        return llamaindex_llm(obj)
    raise TypeError(
        f"cannot get text from {type(obj).__name__}: expected str, a LangChain Document (.page_content), "
        "a LlamaIndex node (.get_content) or a {'text': ...} dict; or pass render="
    )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def default_render(obj: Any) -> str:
    """Text of one document object with the defaults listed in the module docstring."""
    return _default_text(obj)


# ------------------------------------------------------------------ loaders
def _object_id(obj: Any, index: int) -> str:
    for attr in ("id", "id_", "node_id", "doc_id"):
        value = obj.get(attr) if isinstance(obj, dict) else getattr(obj, attr, None)
        if isinstance(value, (str, int)) and value != "":
            return str(value)
    meta = obj.get("metadata") if isinstance(obj, dict) else getattr(obj, "metadata", None)
    if isinstance(meta, dict) and meta.get("source"):
        return f"{meta['source']}#{index}"
    return f"#{index}"


def _rendered(obj: Any, doc_id: str, source: str, render: Render) -> CorpusDoc:
    try:
        text = render(obj)
    except Exception as exc:
        return CorpusDoc(doc_id, "", source, f"render failed: {type(exc).__name__}: {exc}")
    if not isinstance(text, str):
        return CorpusDoc(doc_id, "", source, f"render returned {type(text).__name__}, not str")
    try:
        validate.text("the text", text)
    except KVBoostError as exc:
        return CorpusDoc(doc_id, "", source, str(exc))
    if not text.strip():
        return CorpusDoc(doc_id, "", source, "empty document")
    return CorpusDoc(doc_id, text, source)


def _iter_jsonl(path: Path, render: Render) -> Iterator[CorpusDoc]:
    # Bytes, decoded line by line: an invalid UTF-8 line fails alone, the other lines are warmed.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            source = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                raw = raw[3:]
            try:
                line = validate.utf8(f"line {lineno}", raw)
            except KVBoostError as exc:
                yield CorpusDoc(f"{path.name}:{lineno}", "", source, str(exc))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield CorpusDoc(f"{path.name}:{lineno}", "", source, f"invalid JSON: {exc.msg}")
                continue
            if not isinstance(record, dict):
                yield CorpusDoc(f"{path.name}:{lineno}", "", source, "line is not a JSON object")
                continue
            doc_id = str(record.get("id", f"{path.name}:{lineno}"))
            yield _rendered(record, doc_id, source, render)


def _iter_folder(root: Path, render: Render) -> Iterator[CorpusDoc]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            yield CorpusDoc(rel, "", str(p), f"cannot read file: {exc}")
            continue
        yield _rendered(text, rel, str(p), render)


def iter_documents(source: Any, render: Optional[Render] = None) -> Iterator[CorpusDoc]:
    """Yield :class:`CorpusDoc` for every document in ``source`` (lazily, in order).

    ``source``: a path (``str``/``PathLike``) to a ``.jsonl`` file, a single text file or a folder;
    or an iterable of str / LangChain Documents / LlamaIndex nodes / ``{"text": ...}`` dicts; or a
    single Document / node. A plain ``str`` that is not an existing path is an error (wrap a single
    text in a list) because silently warming a mistyped path as text would be worse.
    """
    render = render or default_render
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise CorpusError(
                f"corpus path {str(source)[:200]!r} does not exist (to warm texts, pass a list of strings)"
            )
        if path.is_dir():
            yield from _iter_folder(path, render)
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(path, render)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as exc:
                yield CorpusDoc(path.name, "", str(path), f"cannot read file: {exc}")
                return
            yield _rendered(text, path.name, str(path), render)
        return
    if hasattr(source, "page_content") or hasattr(source, "get_content"):
        source = [source]
    if isinstance(source, dict) or not isinstance(source, Iterable):
        raise CorpusError(
            f"unsupported corpus type {type(source).__name__}: pass a list of texts / Documents / nodes, "
            "a .jsonl file or a folder"
        )
    for index, obj in enumerate(source):
        kind = "str" if isinstance(obj, str) else type(obj).__name__
        yield _rendered(obj, _object_id(obj, index) if not isinstance(obj, str) else f"#{index}", kind, render)


def load_documents(source: Any, render: Optional[Render] = None) -> List[CorpusDoc]:
    """:func:`iter_documents` as a list."""
    return list(iter_documents(source, render))
