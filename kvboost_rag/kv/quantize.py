"""Optional int8 / int4 quantization of stored KV, KIVI-style.

Why this layout (KIVI, Liu et al. 2024): keys have a few outlier *channels* whose magnitude is
consistent across tokens, so keys are quantized **per channel** (one scale/zero per head_dim
channel, taken over the token axis); values have no such structure but are consumed per token by
the attention-weighted sum, so values are quantized **per token** (one scale/zero per token, over
head_dim). Both are asymmetric (min/max with a zero point), which wastes no code on the sign.

Storage: ``q`` is ``uint8``; with 4 bits two codes share a byte (low nibble first, along the last
axis, padded by one if head_dim is odd). Scales and zeros are kept in float16 when they fit (the
source KV is normally 16-bit anyway), float32 otherwise. The codes are computed *against the
stored, rounded* scale and zero, with the zero rounded down and the scale rounded up, so the
reconstruction error bound below holds exactly for what is on disk:

    |x - dequantize(quantize(x))| <= scale / 2 = (max - min) / (2 * (2**bits - 1))   per group

i.e. at most 1/510 of a group's range for int8 and 1/30 for int4 (plus float rounding of the
dequantized output in the original dtype).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from kvboost_rag.errors import InvalidConfigError

SUPPORTED_BITS = (16, 8, 4)

#: Reduction axis per tensor for ``[layers, kv_heads, tokens, head_dim]`` KV:
#: keys per channel (reduce over tokens), values per token (reduce over head_dim).
KEY_REDUCE_DIM = 2
VALUE_REDUCE_DIM = 3

_FP16_MAX = 60000.0  # a little under float16's 65504, so rounding up cannot overflow


def check_bits(bits: int) -> int:
    """Validate a ``kv_bits`` setting (16 = stored as is)."""
    try:
        bits = int(bits)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"kv_bits must be one of {SUPPORTED_BITS}, got {bits!r}") from None
    if bits not in SUPPORTED_BITS:
        raise InvalidConfigError(f"kv_bits must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def _param_dtype(lo: torch.Tensor, hi: torch.Tensor) -> torch.dtype:
    big = max(float(lo.abs().max()), float(hi.abs().max())) if lo.numel() else 0.0
    return torch.float16 if big < _FP16_MAX else torch.float32


def quantize(x: torch.Tensor, bits: int, reduce_dim: int) -> Dict[str, torch.Tensor]:
    """Quantize ``x`` to ``bits`` (8 or 4) with one scale/zero per slice along ``reduce_dim``.

    Returns ``{"q": uint8 codes, "scale": ..., "zero": ...}``; scale/zero keep ``reduce_dim`` as a
    size-1 axis so they broadcast back. Pure tensor ops: runs on whatever device ``x`` is on.
    """
    if bits not in (8, 4):
        raise InvalidConfigError(f"quantize supports 8 or 4 bits, got {bits}")
    qmax = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(dim=reduce_dim, keepdim=True)
    hi = xf.amax(dim=reduce_dim, keepdim=True)
    pdtype = _param_dtype(lo, hi)
    # Round the zero down and the scale up in the storage dtype so every x lies in
    # [zero, zero + qmax * scale] as reconstructed from the *stored* parameters.
    zero = lo.to(pdtype)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -float("inf"))), zero)
    scale = ((hi - zero.float()) / qmax).clamp_min(1e-7).to(pdtype)
    low_scale = scale.float() * qmax < hi - zero.float()
    scale = torch.where(low_scale, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    q = torch.round((xf - zero.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        q = pack_int4(q)
    return {"q": q.contiguous(), "scale": scale.contiguous(), "zero": zero.contiguous()}


def dequantize(parts: Dict[str, torch.Tensor], bits: int, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`: codes * scale + zero, cast back to ``dtype``."""
    q = parts["q"]
    if bits == 4:
        q = unpack_int4(q, shape[-1])
    if tuple(q.shape) != tuple(shape):
        raise ValueError(f"quantized tensor has shape {tuple(q.shape)}, expected {tuple(shape)}")
    out = q.float() * parts["scale"].float() + parts["zero"].float()
    return out.to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15, uint8) two per byte along the last axis (low nibble first)."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, last_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`; ``last_dim`` drops the padding nibble of an odd axis."""
    lo = packed & 0x0F
    hi = packed >> 4
    out = torch.stack((lo, hi), dim=-1).flatten(-2)
    return out[..., :last_dim]


def quantize_kv(keys: torch.Tensor, values: torch.Tensor, bits: int) -> Dict[str, torch.Tensor]:
    """Tensors to persist for one chunk: ``keys.q``, ``keys.scale``, ``keys.zero``, ``values.*``.

    Keys per channel, values per token (see module docstring)."""
    out: Dict[str, torch.Tensor] = {}
    for name, t, dim in (("keys", keys, KEY_REDUCE_DIM), ("values", values, VALUE_REDUCE_DIM)):
        for part, tensor in quantize(t, bits, dim).items():
            out[f"{name}.{part}"] = tensor
    return out


def dequantize_kv(
    tensors: Dict[str, torch.Tensor], bits: int, shape: Tuple[int, ...], dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rebuild ``(keys, values)`` in ``dtype`` from the tensors written by :func:`quantize_kv`."""
    result = []
    for name in ("keys", "values"):
        parts = {p: tensors[f"{name}.{p}"] for p in ("q", "scale", "zero")}
        result.append(dequantize(parts, bits, shape, dtype))
    return result[0], result[1]


def roundtrip_kv(keys: torch.Tensor, values: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a store with ``kv_bits=bits`` will hand back for these tensors (identity for 16)."""
    if bits == 16:
        return keys, values
    return dequantize_kv(quantize_kv(keys, values, bits), bits, tuple(keys.shape), keys.dtype)


def error_bound(x: torch.Tensor, bits: int, reduce_dim: int) -> torch.Tensor:
    """Largest reconstruction error :func:`quantize` + :func:`dequantize` guarantee, elementwise.

    ``range / (2 * qmax)`` per group, widened by 0.2% for the rounding of the stored float16
    scale/zero, plus one ulp of ``x``'s own dtype for casting the result back (bf16 has only 8
    significant bits, so that term matters there). Used by the tests to state error bounds.
    """
    qmax = (1 << bits) - 1
    xf = x.float()
    rng = xf.amax(dim=reduce_dim, keepdim=True) - xf.amin(dim=reduce_dim, keepdim=True)
    eps = torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 0.0
    return rng / (2 * qmax) * 1.002 + xf.abs() * eps + 1e-6
