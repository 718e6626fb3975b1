"""Candidate selection rules (quality levers), measured on the multi-hop suite before any joins the core.

Each lever is one selection rule (``rule(ctx) -> Selection``) built from the question probe
:func:`kvboost_rag.blend.selection.question_scores`; :func:`register_levers` adds them to
``SELECTION_RULES`` under the names below, so ``engine.generate(..., )`` with an engine whose
``selection`` is one of them runs it. What wins moves into ``kvboost_rag/blend/selection.py``.

* ``attention_layernorm``: scores normalised per layer before summing (cross-layer normalised
  question attention, CLAA-style): a layer whose attention to the documents is diffuse counts as
  much as one where it is peaked.
* ``attention_docs``: a budget across documents. The question's attention mass per document
  decides how much of each is recomputed (proportional shares, top tokens within a document).
* ``attention_wholedocs``: the documents with the most question attention are recomputed whole,
  in order of mass, until the budget is spent (ProphetKV's "crowding-out", Cache-Craft).
* ``attention_neighbours``: each selected token brings its neighbours (+-2 positions, same
  document), the budget unchanged (fewer, wider picks).
"""
from __future__ import annotations

import torch

from kvboost_rag.blend.selection import SELECTION_RULES, Selection, SelectionContext, question_scores


def _selection(ctx: SelectionContext, keep_candidates: torch.Tensor) -> Selection:
    """Must-compute tokens plus the candidates flagged in ``keep_candidates`` (bool [candidates])."""
    keep = ctx.must.clone()
    keep[ctx.candidates[keep_candidates]] = True
    selected = ctx.runner.all_positions[keep]
    return Selection(selected, ctx.runner.embeddings[selected], 0)


def attention_layernorm(ctx: SelectionContext) -> Selection:
    per_layer = question_scores(ctx, per_layer=True)[:, ctx.candidates]
    per_layer = per_layer / per_layer.sum(dim=1, keepdim=True).clamp_min(1e-12)
    selected = ctx.choose(per_layer.sum(dim=0))
    return Selection(selected, ctx.runner.embeddings[selected], 0)


def _document_of_candidates(ctx: SelectionContext) -> torch.Tensor:
    """Index of the document each candidate belongs to ([candidates], -1 if none)."""
    owner = torch.full_like(ctx.candidates, -1)
    for index, (start, end) in enumerate(ctx.documents):
        owner[(ctx.candidates >= start) & (ctx.candidates < end)] = index
    return owner


def attention_docs(ctx: SelectionContext) -> Selection:
    scores = question_scores(ctx)[ctx.candidates]
    owner = _document_of_candidates(ctx)
    mass = torch.stack([scores[owner == d].sum() for d in range(len(ctx.documents))])
    shares = (mass / mass.sum().clamp_min(1e-12) * ctx.budget).floor().long()
    keep = torch.zeros_like(ctx.candidates, dtype=torch.bool)
    for d, share in enumerate(shares.tolist()):
        idx = (owner == d).nonzero().flatten()
        if share > 0 and idx.numel():
            keep[idx[torch.topk(scores[idx], min(share, idx.numel())).indices]] = True
    left = ctx.budget - int(keep.sum())
    if left > 0:  # rounding remainder: the best tokens not yet kept
        rest = scores.masked_fill(keep, float("-inf"))
        keep[torch.topk(rest, left).indices] = True
    return _selection(ctx, keep)


def attention_wholedocs(ctx: SelectionContext) -> Selection:
    scores = question_scores(ctx)[ctx.candidates]
    owner = _document_of_candidates(ctx)
    mass = torch.stack([scores[owner == d].sum() for d in range(len(ctx.documents))])
    keep = torch.zeros_like(ctx.candidates, dtype=torch.bool)
    left = ctx.budget
    for d in torch.argsort(mass, descending=True).tolist():
        idx = (owner == d).nonzero().flatten()
        if left <= 0:
            break
        take = idx if idx.numel() <= left else idx[torch.topk(scores[idx], left).indices]
        keep[take] = True
        left -= take.numel()
    return _selection(ctx, keep)


def attention_neighbours(ctx: SelectionContext, width: int = 2) -> Selection:
    scores = question_scores(ctx)[ctx.candidates]
    owner = _document_of_candidates(ctx)
    keep = torch.zeros_like(ctx.candidates, dtype=torch.bool)
    for i in torch.argsort(scores, descending=True).tolist():
        if int(keep.sum()) >= ctx.budget:
            break
        lo, hi = max(0, i - width), min(len(scores), i + width + 1)
        window = torch.arange(lo, hi)
        keep[window[owner[window] == owner[i]]] = True
    return _selection(ctx, keep)


LEVERS = {
    "attention_layernorm": attention_layernorm,
    "attention_docs": attention_docs,
    "attention_wholedocs": attention_wholedocs,
    "attention_neighbours": attention_neighbours,
}


def register_levers() -> list[str]:
    """Add the candidate rules to the core registry (for experiments); returns their names."""
    SELECTION_RULES.update(LEVERS)
    return list(LEVERS)
