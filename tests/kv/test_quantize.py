"""KIVI-style int8 / int4 quantization: error bounds, byte savings, store round trips."""
import pytest
import torch

from kvboost_rag.testing.store import synthetic_chunk
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.errors import InvalidConfigError
from kvboost_rag.kv.quantize import (
    KEY_REDUCE_DIM,
    VALUE_REDUCE_DIM,
    check_bits,
    dequantize_kv,
    error_bound,
    pack_int4,
    quantize_kv,
    unpack_int4,
)


def _kv(dtype, tokens=50, head_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 2, tokens, head_dim)
    keys = torch.randn(shape, generator=g) * 2 + 6 * torch.randn((1, 1, 1, head_dim), generator=g)
    values = torch.randn(shape, generator=g)
    return keys.to(dtype), values.to(dtype)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_error_within_stated_bound(dtype, bits):
    """|x - deq(q(x))| <= range/(2*(2^bits-1)) per group (+ float rounding), for keys per channel
    and values per token; also report the max error relative to the tensor's max magnitude."""
    keys, values = _kv(dtype)
    k2, v2 = dequantize_kv(quantize_kv(keys, values, bits), bits, tuple(keys.shape), dtype)
    assert k2.dtype == dtype and v2.dtype == dtype
    for x, y, dim in ((keys, k2, KEY_REDUCE_DIM), (values, v2, VALUE_REDUCE_DIM)):
        err = (y.float() - x.float()).abs()
        assert torch.all(err <= error_bound(x, bits, dim)), float((err / error_bound(x, bits, dim)).max())
        rel = float(err.max() / x.float().abs().max())
        # stated bounds: int8 under 0.5% of the largest magnitude, int4 under 8%
        assert rel < (0.005 if bits == 8 else 0.08), rel


def test_int8_halves_bytes_of_16bit_and_int4_quarters():
    for dtype in (torch.float16, torch.bfloat16):
        keys, values = _kv(dtype, tokens=256)
        raw = 2 * keys.numel() * keys.element_size()
        q8 = _nbytes(quantize_kv(keys, values, 8)) / raw
        q4 = _nbytes(quantize_kv(keys, values, 4)) / raw
        assert 0.5 <= q8 <= 0.55, q8   # codes are exactly half; scales add ~3% for head_dim 64
        assert 0.25 <= q4 <= 0.30, q4
    keys, values = _kv(torch.float32, tokens=256)
    assert _nbytes(quantize_kv(keys, values, 8)) < 0.3 * 2 * keys.numel() * 4  # fp32: under a third


def test_pack_int4_round_trip_odd_width():
    q = torch.randint(0, 16, (2, 3, 5, 7), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape[-1] == 4
    assert torch.equal(unpack_int4(packed, 7), q)


def test_constant_tensor_and_large_values():
    keys = torch.full((1, 1, 4, 8), 3.25)
    values = torch.full((1, 1, 4, 8), -1e5)  # beyond float16: scales fall back to float32
    k2, v2 = dequantize_kv(quantize_kv(keys, values, 8), 8, tuple(keys.shape), torch.float32)
    assert torch.allclose(k2, keys) and torch.allclose(v2, values, rtol=1e-5)


def test_check_bits():
    assert check_bits("8") == 8
    for bad in (2, 12, "x", None):
        with pytest.raises(InvalidConfigError):
            check_bits(bad)


@pytest.mark.parametrize("bits", [8, 4])
def test_disk_store_quantized_round_trip(tmp_path, bits):
    chunk = synthetic_chunk(200, head_dim=64, dtype=torch.bfloat16)
    plain = DiskStore(tmp_path / "p", kv_bits=16)
    quant = DiskStore(tmp_path / "q", kv_bits=bits)
    n16 = plain.put("ab" * 8, chunk)
    nq = quant.put("ab" * 8, chunk)
    got = quant.get("ab" * 8, chunk.fingerprint)
    assert got.keys.dtype == torch.bfloat16 and got.token_ids == chunk.token_ids and got.start == chunk.start
    assert torch.all((got.keys.float() - chunk.keys.float()).abs() <= error_bound(chunk.keys, bits, KEY_REDUCE_DIM))
    assert torch.all((got.values.float() - chunk.values.float()).abs() <= error_bound(chunk.values, bits, VALUE_REDUCE_DIM))
    # whole files (header + token ids included): int8 about half of bf16, int4 about a quarter
    ratio = nq / n16
    assert ratio < (0.56 if bits == 8 else 0.31), ratio
    # the memory tier must hold what disk returns
    again = quant.as_stored(chunk)
    assert torch.equal(again.keys, got.keys) and torch.equal(again.values, got.values)
