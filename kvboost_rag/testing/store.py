"""Helpers for the store / quantize / warm / CLI tests (kept apart from conftest.py).

Two kinds of "engines":

* :class:`FakeEngine`: implements only the warm-time part of the engine contract
  (tokenize_document, chunk_key, encode_batch, register_text, store, fingerprint, context_window)
  with deterministic synthetic tensors. Imports torch only, so subprocess tests start fast, and it
  isolates the store/warm logic from the real engine.
* :func:`tiny_model_factory`: a real, random-weight 2-layer Llama plus the in-memory byte-level BPE
  tokenizer of :mod:`kvboost_rag.testing.models`, deterministic across processes, for tests that must
  go through the real :class:`~kvboost_rag.engine.KVBoostEngine`. Module-level, hence picklable
  by reference for Ray actors.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import zlib
from typing import List, Optional

import torch

from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.store.memory import MemoryStore

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega river mountain cache store token layer vector").split()


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> List[str]:
    """``n`` distinct pseudo-random documents of varied length (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)]
        docs.append(f"Document {i}: " + " ".join(words) + ".")
    return docs


def synthetic_chunk(num_tokens: int = 12, fingerprint: str = "fp-a", *, layers: int = 2, heads: int = 2,
                    head_dim: int = 16, dtype=torch.float16, seed: int = 0, text: Optional[str] = "doc") -> KVChunk:
    g = torch.Generator().manual_seed(seed)
    shape = (layers, heads, num_tokens, head_dim)
    # a few outlier channels in keys, as real models have (what per-channel key scales are for)
    keys = torch.randn(shape, generator=g) + 4 * torch.randn((1, 1, 1, head_dim), generator=g)
    values = torch.randn(shape, generator=g)
    return KVChunk(keys.to(dtype), values.to(dtype), start=7, token_ids=tuple(range(100, 100 + num_tokens)),
                   fingerprint=fingerprint, text=text, meta={"encoding_version": "1"})


class FakeEngine:
    """Deterministic stand-in for the warm-time engine API (see module docstring)."""

    def __init__(self, store=None, fingerprint: str = "fake-fp-1", delay_s: float = 0.0, context_window: int = 512):
        self.store = store if store is not None else MemoryStore()
        self.fingerprint = fingerprint
        self.delay_s = delay_s
        self.context_window = context_window
        self.encoded_texts: List[str] = []
        self.registered: set = set()
        self.encode_calls = 0
        self.contexts: List[List[int]] = []  # the context ids each encoded document got

    def tokenize_document(self, text: str) -> List[int]:
        return [zlib.crc32(w.encode()) % 1000 for w in text.split()]

    def chunk_key(self, token_ids, encoding: str = "isolated") -> str:
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(encoding.encode())
        h.update(",".join(map(str, token_ids)).encode())
        return h.hexdigest()

    def encode_batch(self, texts: List[str], contexts=None) -> List[KVChunk]:
        self.encode_calls += 1
        self.contexts.extend(list(c) for c in (contexts or [[] for _ in texts]))
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for text in texts:
            if "FAIL-ENCODE" in text:
                raise RuntimeError("synthetic encoder failure")
            ids = self.tokenize_document(text)
            seed = zlib.crc32(text.encode())
            chunk = synthetic_chunk(len(ids), self.fingerprint, seed=seed, text=text)
            out.append(KVChunk(chunk.keys, chunk.values, 4, tuple(ids), self.fingerprint, text, {"encoding_version": "1"}))
            self.encoded_texts.append(text)
        return out

    def encode_after(self, text: str, neighbours) -> KVChunk:
        """As the engine's: one document after its neighbours' stored chunks (their token ids are
        recorded as its context, like ``encode_batch``'s)."""
        return self.encode_batch([text], contexts=[[t for c in neighbours for t in c.token_ids]])[0]

    def register_text(self, text: str) -> None:
        self.registered.add(text)


def fake_engine_factory(fingerprint: str = "fake-fp-1", delay_s: float = 0.0):
    return FakeEngine(fingerprint=fingerprint, delay_s=delay_s)


# ------------------------------------------------------------ tiny real model
def tiny_model(seed: int = 0, layers: int = 2):
    """The shared tiny Llama (:mod:`kvboost_rag.testing.models`), ``layers`` deep."""
    from kvboost_rag.testing.models import tiny_model as shared_tiny_model

    return shared_tiny_model("llama", seed=seed, num_hidden_layers=layers)


def tiny_model_factory():
    """(model, tokenizer) for ``warm_corpus`` / Ray actors."""
    from kvboost_rag.testing.models import tiny_tokenizer

    torch.set_num_threads(1)
    return tiny_model(0), tiny_tokenizer()


def other_tiny_model_factory():
    """A different model (other seed and depth): its entries must never be served to the first."""
    from kvboost_rag.testing.models import tiny_tokenizer

    torch.set_num_threads(1)
    return tiny_model(1, layers=3), tiny_tokenizer()


def python_env() -> dict:
    """Environment for subprocesses: repo + tests importable, quiet progress bars, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["TQDM_DISABLE"] = "1"
    return env


PYTHON = sys.executable
