"""Content-addressed keys for KV chunks.

A chunk's KV depends on the model, on the tokens, and on how it was encoded (the preamble it
was encoded after, the encoding scheme). All of them go into the key, so a key computed for one
model can never hit an entry made by another, and a change of encoding scheme invalidates old
entries instead of silently reusing them.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

# Bump when the way a document is encoded changes (preamble handling, positions, layout).
ENCODING_VERSION = "kvboost-enc-1"


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype=np.int64).tobytes()


def chunk_key(fingerprint: str, preamble_ids: Sequence[int], token_ids: Sequence[int],
              encoding_version: str = ENCODING_VERSION) -> str:
    """Hex sha256 over (model fingerprint, encoding version, preamble ids, document ids)."""
    h = hashlib.sha256()
    for part in (fingerprint.encode(), encoding_version.encode(), _ids_bytes(preamble_ids), _ids_bytes(token_ids)):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()
