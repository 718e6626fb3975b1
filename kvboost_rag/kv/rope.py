"""Move stored keys to new positions by re-rotating them (RoPE).

RoPE rotates each channel pair by ``position * inv_freq``. Rotations compose,
``R(p_new) = R(p_new - p_old) R(p_old)``, so a key stored after RoPE at ``p_old`` becomes the
key at ``p_new`` by one more rotation of ``delta = p_new - p_old``; values carry no position.

We use the model's own ``inv_freq`` (which already includes ``linear``, ``llama3`` and YaRN
frequency scaling) and deliberately *not* its ``attention_scaling`` factor: YaRN multiplies
cos/sin by it when the key is first rotated, applying it again would scale twice. Partial
rotary models rotate only their first ``rotary_dim`` channels. Layout is the Hugging Face
"rotate_half" one: channel i pairs with channel i + rotary_dim/2.
"""
from __future__ import annotations

import functools

import torch

from kvboost_rag.errors import UnsupportedModelError


class RopeRotator:
    """Rotates key tensors ``[..., tokens, head_dim]`` by a position delta.

    ``inv_freq``: the model's rotary inverse frequencies (``adapter.inv_freq(model)``, see
    :mod:`kvboost_rag.models.adapters`); ``rotary_dim`` is twice their count."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().to("cpu", torch.float64)
        self.rotary_dim = 2 * self.inv_freq.numel()
        # one entry per (delta, dtype, device): deltas repeat across prompts (same document slots)
        self.cos_sin = functools.lru_cache(maxsize=4096)(self._cos_sin)
        self.matrix = functools.lru_cache(maxsize=4096)(self._matrix)

    def _cos_sin(self, delta: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``delta * inv_freq`` laid out as ``[rotary_dim]`` (computed in float64)."""
        angles = float(delta) * self.inv_freq
        angles = torch.cat([angles, angles])
        return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)

    def _matrix(self, delta: int, dtype: torch.dtype, device: torch.device, head_dim: int) -> torch.Tensor:
        """The rotation by ``delta`` as a ``[head_dim, head_dim]`` matrix acting on row vectors
        (``k @ R``), built in float64; channels past ``rotary_dim`` pass through."""
        half = self.rotary_dim // 2
        angles = float(delta) * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        r = torch.eye(head_dim, dtype=torch.float64)
        i = torch.arange(half)
        r[i, i] = cos
        r[i + half, i + half] = cos
        r[i + half, i] = -sin      # out[i] = k[i] cos - k[i + half] sin
        r[i, i + half] = sin       # out[i + half] = k[i + half] cos + k[i] sin
        return r.to(device=device, dtype=dtype)

    def rotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """A new tensor: ``keys`` moved by ``delta`` positions."""
        out = torch.empty_like(keys)
        self.rotate_into(out, keys, delta)
        return out

    def rotate_into(self, out: torch.Tensor, keys: torch.Tensor, delta: int) -> None:
        """Write ``keys`` rotated by ``delta`` into ``out`` (same shape): out = k*cos +
        rotate_half(k)*sin, element-wise for float32 (no temporaries), as one ``k @ R(delta)``
        matmul for 16-bit dtypes (one temporary of the keys' size)."""
        rd = self.rotary_dim
        if keys.shape[-1] < rd:
            raise UnsupportedModelError(f"head_dim {keys.shape[-1]} is smaller than rotary dim {rd}")
        if delta == 0:
            out.copy_(keys)
            return
        if keys.dtype.itemsize < 4:
            # bfloat16/float16: one small matmul with float32 accumulation, rounded once, rides the
            # fast matmul kernels (faster than the four element-wise passes below, each of which
            # rounds to the low precision).
            out.copy_(torch.matmul(keys, self.matrix(int(delta), keys.dtype, keys.device, keys.shape[-1])))
            return
        cos, sin = self.cos_sin(int(delta), keys.dtype, keys.device)
        half = rd // 2
        k1, k2 = keys[..., :half], keys[..., half:rd]
        c, s = cos[:half], sin[:half]  # both halves share the same angles
        # rotate_half(k) = [-k2, k1]
        torch.mul(k1, c, out=out[..., :half])
        out[..., :half].addcmul_(k2, s, value=-1.0)
        torch.mul(k2, c, out=out[..., half:rd])
        out[..., half:rd].addcmul_(k1, s)
        if rd < keys.shape[-1]:
            out[..., rd:].copy_(keys[..., rd:])
