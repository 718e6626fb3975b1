"""Attention of scattered query positions over a blended K/V buffer, masked by absolute position.

The selected tokens sit anywhere in the prompt. A token at position ``p`` must see the keys at
positions ``<= p`` and nothing later (a mask aligned bottom-right over a scattered selection, a
known bug in public implementations, would let early tokens see later ones). Queries are sorted by
position and processed in blocks; a block attends only to the keys up to its last position. The
blocks are planned per pass (:func:`plan_blocks`) so that few queries sit far before their
block's end: a block's cost is its queries times its last position, and the selected tokens are
not spread evenly (the question probe picks whole passages, sinks sit at every document's start).

Grouped-query attention is handled by folding the query heads of a group into the query axis, so
K/V are never copied per head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class BlendMetadata:
    """Per-request state of one blend pass (one selection of tokens run through the layers).

    positions: [S] sorted absolute positions of the tokens being run.
    block_size: the most queries in one attention block.
    blocks: (start, stop) slices of ``positions``, one per attention block, and ``masks`` their
        additive masks; ``cos_sin``: the tokens' RoPE cos/sin. All built by the first layer and
        reused by the others (the selection is the same in every layer).
    scores: optional [N] accumulator: the attention probabilities that the ``score_rows`` queries
        (bool [S]) pay each key are added to it, summed over heads and layers (question probe).
    """

    positions: torch.Tensor
    block_size: int
    scores: Optional[torch.Tensor] = None
    score_rows: Optional[torch.Tensor] = None
    blocks: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    cos_sin: Optional[tuple] = None


# Fixed cost of one attention call, in (query tokens x keys) of attention work: on the CPU flash
# kernel (bfloat16 and float32) a call costs about as much as 40 queries over 1k keys.
BLOCK_CALL_COST = 40 * 1024
_PLAN_UNIT = 16   # blocks are planned in units of this many queries


def plan_blocks(positions: list[int], max_block: int, call_cost: int = BLOCK_CALL_COST) -> list[tuple[int, int]]:
    """Split sorted query positions into blocks (``(start, stop)`` index slices) minimising the
    attention work: a block of ``n`` queries ending at position ``p`` costs ``n * (p + 1)`` key
    reads plus ``call_cost``. Exact dynamic programme over units of 16 queries (blocks of at most
    ``max_block``): a few dozen units, so planning costs little next to the attention it plans."""
    count = len(positions)
    unit = max(1, min(_PLAN_UNIT, max_block))
    cuts = list(range(0, count, unit)) + [count]       # unit boundaries
    longest = max(1, max_block // unit)
    best = [0.0] + [float("inf")] * (len(cuts) - 1)
    back = [0] * len(cuts)
    for j in range(1, len(cuts)):
        end = positions[cuts[j] - 1] + 1
        for i in range(max(0, j - longest), j):
            cost = best[i] + call_cost + (cuts[j] - cuts[i]) * end
            if cost < best[j]:
                best[j], back[j] = cost, i
    blocks, j = [], len(cuts) - 1
    while j > 0:
        blocks.append((cuts[back[j]], cuts[j]))
        j = back[j]
    return blocks[::-1]


def blended_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                      meta: BlendMetadata) -> torch.Tensor:
    """query: [1, heads, S, d] at ``meta.positions``; key/value: [kv_heads, N, d] the whole blended
    buffer of this layer. Returns the attention output [1, heads, S, d]."""
    _, heads, length, dim = query.shape
    kv_heads = key.shape[0]
    groups = heads // kv_heads
    grouped = query.view(1, kv_heads, groups, length, dim)
    out = torch.empty((1, kv_heads, groups, length, value.shape[-1]), dtype=query.dtype, device=query.device)
    keys, values = key.unsqueeze(0), value.unsqueeze(0)
    if not meta.blocks:
        meta.blocks = plan_blocks(meta.positions.tolist(), meta.block_size)
    for index, (b0, b1) in enumerate(meta.blocks):
        n = b1 - b0
        if index == len(meta.masks):
            meta.masks.append(_block_mask(meta.positions[b0: b1], groups, query.dtype))
        mask = meta.masks[index]
        end = mask.shape[-1]
        q = grouped[:, :, :, b0: b1].reshape(1, kv_heads, groups * n, dim)
        k, v = keys[:, :, :end], values[:, :, :end]
        rows = meta.score_rows[b0: b1] if meta.scores is not None else None
        scored = rows is not None and bool(rows.any())
        if scored and q.dtype == torch.float32:
            o, probs = _attention_and_probabilities(q, k, v, mask, scale)
            meta.scores[:end] += probs.view(kv_heads, groups, n, end)[:, :, rows].sum(dim=(0, 1, 2))
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            if scored:
                meta.scores[:end] += _row_probabilities(q, k, mask, scale, rows, groups)
        out[:, :, :, b0: b1] = o.view(1, kv_heads, groups, n, -1)
    return out.view(1, heads, length, -1)


def _attention_and_probabilities(q, k, v, mask, scale):
    """float32 models: plain attention that also returns its probabilities ([1, kv_heads, rows,
    keys]). One QK product serves the output (to go on to the next layer) and the ranking; on the
    benchmark's prompts that is faster than the fused kernel plus a second product, with
    identical top-1 and KL."""
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask)
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, v), probs


def _row_probabilities(q, k, mask, scale, rows, groups) -> torch.Tensor:
    """bfloat16/float16 models: the attention probabilities that the ``rows`` (bool [n]) of a
    query block pay each key, summed over heads and rows: [keys] float32.

    The block's output comes from the fused kernel; only the question's rows (a few dozen) get a
    second QK product, in the model's dtype (it rides the fast matmul kernels; float copies of K
    and V would not, and would make the probe slower), with the softmax in float32."""
    _, kv_heads, _, dim = q.shape
    n = rows.shape[0]
    qr = q.view(kv_heads, groups, n, dim)[:, :, rows].reshape(kv_heads, -1, dim)
    m = mask.view(groups, n, -1)[:, rows].reshape(-1, mask.shape[-1])
    logits = torch.baddbmm(m.expand(kv_heads, -1, -1), qr, k[0].transpose(-1, -2), alpha=scale)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).sum(dim=(0, 1))


def _block_mask(pos: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal mask by absolute position for one query block, additive and float: [1, 1, groups * n,
    end] with ``end`` = last position + 1 (the CPU flash kernel runs faster with a float mask
    than with a bool one)."""
    end = int(pos[-1]) + 1
    allowed = torch.arange(end, device=pos.device).unsqueeze(0) <= pos.unsqueeze(1)
    mask = torch.zeros((groups * pos.shape[0], end), dtype=dtype, device=pos.device)
    mask.masked_fill_(~allowed.repeat(groups, 1), float("-inf"))
    return mask[None, None]
