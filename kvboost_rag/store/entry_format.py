"""The on-disk format of one store entry: a safetensors file, and how a KVChunk becomes one and back.

What a file holds and why it can be trusted:

* **No pickle**: safetensors holds raw tensors plus a string->string header, nothing executable.
* **Checksum**: a 128-bit XXH3 over every tensor's name, dtype, shape and bytes *and* over the
  other header fields is stored in the header, so a truncated or bit-flipped entry fails it (or
  fails to parse). XXH3 detects damage, not tampering: the store is trusted like any cache
  directory. An entry whose header carries a ``sha256`` field instead is verified with sha256.
* **Typed header**: every reader checks the header fields' types and consistency
  (:func:`_fields`) and that the tensors' byte ranges account for the whole file
  (:func:`_layout`), so a wrong header is a damaged entry, never an exception from ``int()``.
* **Model isolation**: the header records the model fingerprint, which the store compares on
  every read.

Header fields (strings): format, fingerprint, encoding_version, num_tokens, start, dtype, shape,
kv_bits, created, last_used (= created; the store keeps the live last-used time in the file's
mtime, so a hit never rewrites an entry), has_text, text, meta (JSON of ``chunk.meta``),
xxh3_128 (or sha256). Token ids are an ``int32`` tensor in the file, not header text.

A verified entry's tensors are views of the buffer the file was read into (:func:`_tensor_view`),
so an entry is never copied twice. Reading files safely is :mod:`kvboost_rag.store.safe_files`;
the store itself is :mod:`kvboost_rag.store.disk` (design: docs/store.md).
"""
from __future__ import annotations

import hashlib
import json
import re
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import xxhash
from safetensors.torch import save as st_save

from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.quantize import dequantize_kv, quantize_kv, roundtrip_kv

FORMAT = "kvboost-rag-kv/1"
SUFFIX = ".safetensors"
#: safetensors' own limit on the JSON header; a larger length prefix is damage, not an entry.
MAX_HEADER_BYTES = 100 << 20

#: Checksum header field -> hash constructor. New entries use the first; the others are read.
_CHECKSUMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_WRITE_CHECKSUM = "xxh3_128"

# safetensors dtype codes as they appear in the JSON header.
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "I8": "int8",
              "I32": "int32", "I64": "int64", "F64": "float64"}
_KV_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class EntryInfo:
    """What the header of one entry says (no tensors loaded)."""

    key: str
    path: Path
    fingerprint: str
    num_tokens: int
    kv_bits: int
    dtype: str
    nbytes: int
    created: float
    last_used: float
    encoding_version: str
    has_text: bool
    encoding: str = "isolated"    # "context": encoded after related documents (their keys in ``context``)
    context: tuple = ()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _checksum(metadata: Dict[str, str], pieces: List[tuple], field: str) -> str:
    """Hash (named by ``field``) over the header fields except checksums, and each tensor by name."""
    h = _CHECKSUMS[field]()
    fields = {k: v for k, v in metadata.items() if k not in _CHECKSUMS}
    h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode())
    for name, dtype, shape, data, *_ in sorted(pieces, key=lambda p: p[0]):
        h.update(f"\0{name}\0{dtype}\0{shape}\0".encode())
        h.update(data)
    return h.hexdigest()


def _checksum_field(metadata: Dict[str, str]) -> Optional[str]:
    return next((f for f in _CHECKSUMS if f in metadata), None)


def _layout(header: dict, n: int, size: int) -> Tuple[Dict[str, str], List[Tuple[str, str, List[int], int, int]]]:
    """Metadata and ``(name, dtype, shape, begin, end)`` of each tensor (absolute offsets).

    Raises ValueError unless every field has the right type, each tensor's byte range matches its
    dtype and shape, and the tensors end exactly at ``size``: the size bound that lets a reader
    reject a truncated, padded or absurdly large file before reading its body."""
    header = dict(header)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("header metadata is not a string -> string map")
    base, end_max, specs = 8 + n, 0, []
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"] if type(d) is int and d >= 0]
            begin, end = (int(o) for o in info["data_offsets"] if type(o) is int)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: malformed header entry {info!r:.200}") from None
        if len(shape) != len(info["shape"]) or not 0 <= begin <= end:
            raise ValueError(f"tensor {name!r}: malformed shape or offsets")
        if end - begin != math.prod(shape) * getattr(torch, dtype).itemsize:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes do not match {dtype} {shape}")
        end_max = max(end_max, end)
        specs.append((name, dtype, shape, base + begin, base + end))
    if base + end_max != size:
        raise ValueError(f"file is {size} bytes, header describes {base + end_max} (truncated or padded)")
    return metadata, specs


def _fields(m: Dict[str, str]) -> dict:
    """The typed header fields of an entry, or ValueError naming the first bad one.

    Every reader goes through this, so a header with wrong types (``num_tokens: "q0"``) or
    inconsistent ones is a damaged entry (a miss), never an exception out of ``int()``."""
    if m.get("format") != FORMAT:
        raise ValueError(f"not a kvboost-rag entry (format={m.get('format')!r})")
    if _checksum_field(m) is None:
        raise ValueError("header has no checksum")

    def field(name, conv, ok=lambda v: True):
        try:
            value = conv(m[name])
            if ok(value):
                return value
        except (KeyError, TypeError, ValueError):
            pass
        raise ValueError(f"header field {name}={m.get(name)!r:.80} is invalid")

    shape = field("shape", json.loads,
                  lambda s: isinstance(s, list) and len(s) == 4 and all(type(d) is int and d >= 0 for d in s))
    meta = field("meta", json.loads, lambda v: isinstance(v, dict))
    encoding, context = _context_of(meta)
    return {
        "fingerprint": field("fingerprint", str),
        "num_tokens": field("num_tokens", int, lambda n: n == shape[2]),
        "start": field("start", int, lambda v: v >= 0),
        "kv_bits": field("kv_bits", int, lambda b: b in (16, 8, 4)),
        "dtype": field("dtype", str, lambda d: d in _KV_DTYPES),
        "shape": shape,
        "created": field("created", float),
        "meta": meta,
        "encoding": encoding,
        "context": context,
    }


_KEY_HEX = re.compile(r"[0-9a-f]{64}")


def _context_of(meta: dict) -> tuple:
    """(encoding, context keys) recorded in an entry's metadata; ValueError if they are malformed:
    an isolated entry has no context, a context entry's context is a list of document keys."""
    encoding = meta.get("encoding", "isolated")
    context = meta.get("context", "")
    if encoding not in ("isolated", "context") or not isinstance(context, str):
        raise ValueError(f"header meta encoding={encoding!r:.40} / context={context!r:.40} is invalid")
    keys = tuple(k for k in context.split(",") if k)
    if (encoding == "isolated" and keys) or not all(_KEY_HEX.fullmatch(k) for k in keys):
        raise ValueError(f"header meta context {context!r:.80} does not fit encoding {encoding!r}")
    return encoding, keys


def _entry_info(path: Path, st: os.stat_result, m: Dict[str, str]) -> EntryInfo:
    """The :class:`EntryInfo` of the entry at ``path`` from its ``lstat`` and header metadata;
    ValueError if the header fields are bad (see :func:`_fields`)."""
    f = _fields(m)
    return EntryInfo(
        key=path.name[: -len(SUFFIX)],
        path=path,
        fingerprint=f["fingerprint"],
        num_tokens=f["num_tokens"],
        kv_bits=f["kv_bits"],
        dtype=f["dtype"],
        nbytes=st.st_size,
        created=f["created"],
        last_used=st.st_mtime,
        encoding_version=m.get("encoding_version", ""),
        has_text=m.get("has_text") == "1",
        encoding=f["encoding"],
        context=f["context"],
    )


def _tensor_view(data: bytearray, dtype: str, shape: List[int], offset: int, nbytes: int) -> torch.Tensor:
    """A tensor sharing ``nbytes`` of ``data`` from ``offset`` (safetensors aligns them to 8 bytes)."""
    torch_dtype = getattr(torch, dtype)
    count = nbytes // torch_dtype.itemsize
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(data, dtype=torch_dtype, count=count, offset=offset).view(shape)


def _serialize(chunk: KVChunk, kv_bits: int) -> bytes:
    """The entry file for ``chunk``: its tensors (quantized unless ``kv_bits`` is 16), token ids
    and the header fields, with the checksum over all of them."""
    keys = chunk.keys.detach().to("cpu").contiguous()
    values = chunk.values.detach().to("cpu").contiguous()
    if kv_bits == 16:
        tensors = {"keys": keys, "values": values}
    else:
        tensors = quantize_kv(keys, values, kv_bits)
    tensors["token_ids"] = torch.tensor(list(chunk.token_ids), dtype=torch.int32)
    now = f"{time.time():.3f}"
    metadata = {
        "format": FORMAT,
        "fingerprint": str(chunk.fingerprint),
        "encoding_version": str(chunk.meta.get("encoding_version", chunk.meta.get("version", ""))),
        "num_tokens": str(chunk.num_tokens),
        "start": str(int(chunk.start)),
        "dtype": _dtype_name(keys.dtype),
        "shape": json.dumps(list(keys.shape)),
        "kv_bits": str(kv_bits),
        "created": now,
        "last_used": now,
        "has_text": "1" if chunk.text is not None else "0",
        "text": chunk.text or "",
        "meta": json.dumps(chunk.meta, sort_keys=True, default=str),
    }
    pieces = [(n, _dtype_name(t.dtype), list(t.shape), _tensor_bytes(t)) for n, t in tensors.items()]
    metadata[_WRITE_CHECKSUM] = _checksum(metadata, pieces, _WRITE_CHECKSUM)
    return st_save(tensors, metadata=metadata)


def _deserialize(metadata: Dict[str, str], specs: list, data: bytearray) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """Verify an entry read by :func:`kvboost_rag.store.safe_files._read_entry`; raises ValueError
    naming what is wrong. The tensors are views of ``data`` (which they keep alive), so a verified
    entry is never copied twice."""
    _fields(metadata)
    field = _checksum_field(metadata)
    view = memoryview(data)
    pieces = [(name, dtype, shape, view[begin:end]) for name, dtype, shape, begin, end in specs]
    if _checksum(metadata, pieces, field) != metadata[field]:
        raise ValueError("checksum mismatch (bytes changed after writing)")
    return metadata, {name: _tensor_view(data, dtype, shape, begin, end - begin)
                      for name, dtype, shape, begin, end in specs}


def _to_chunk(metadata: Dict[str, str], tensors: Dict[str, torch.Tensor]) -> KVChunk:
    """The KVChunk of a verified entry (dequantized to its recorded dtype when kv_bits < 16)."""
    f = _fields(metadata)
    dtype = getattr(torch, f["dtype"])
    if f["kv_bits"] == 16:
        keys, values = tensors["keys"], tensors["values"]
    else:
        keys, values = dequantize_kv(tensors, f["kv_bits"], tuple(f["shape"]), dtype)
    if list(keys.shape) != f["shape"] or keys.dtype != dtype:
        raise ValueError(f"tensors are {keys.dtype} {list(keys.shape)}, header says {f['dtype']} {f['shape']}")
    return KVChunk(
        keys=keys,
        values=values,
        start=f["start"],
        token_ids=tuple(tensors["token_ids"].reshape(-1).tolist()),
        fingerprint=f["fingerprint"],
        text=metadata.get("text", "") if metadata.get("has_text") == "1" else None,
        meta=f["meta"],
    )


def _as_stored(chunk: KVChunk, kv_bits: int) -> KVChunk:
    """The chunk that reading back the entry of ``chunk`` written with ``kv_bits`` yields
    (quantization round trip applied)."""
    if kv_bits == 16:
        return chunk
    keys, values = roundtrip_kv(chunk.keys.detach(), chunk.values.detach(), kv_bits)
    return KVChunk(keys, values, chunk.start, tuple(chunk.token_ids), chunk.fingerprint, chunk.text, dict(chunk.meta))
