"""Selection rules: which reused tokens a blend recomputes.

A rule is one function ``rule(ctx: SelectionContext) -> Selection`` and one line in
:data:`SELECTION_RULES`. It may run layers to decide (through ``ctx.runner``); it hands back the
chosen positions (every must-compute token included, via :meth:`SelectionContext.choose`) and the
hidden state it reached, so the blend goes on from there without repeating work.

* ``"attention"`` (the default): the question ranks the documents. The error that changes
  answers is in what the question reads, not where the KV deviates most, so at the same ratio
  this rule keeps answers closer to a full prefill than an oracle that recomputes the
  most-deviating tokens (docs/architecture.md; figures in docs/benchmarks.md).
* ``"value"`` / ``"key"``: CacheBlend's rule (EuroSys 2025): run every token up to the check
  layer and recompute the reused tokens whose V (or K) deviates most from the stored one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kvboost_rag.phases import phase
from kvboost_rag.blend.layers import LayerRunner
from kvboost_rag.config import SELECTION_RULES


@dataclass
class SelectionContext:
    """What a rule may look at. Masks are bool [N]; ``candidates`` are positions."""

    runner: LayerRunner
    reused: torch.Tensor        # stored (re-rotated) KV sits in the blend buffer
    unstored: torch.Tensor      # no stored KV (always computed), plus the last token
    must: torch.Tensor          # unstored + each document's sink tokens: always recomputed
    candidates: torch.Tensor    # reused tokens a rule may pick (not must, not an exact prefix)
    ratio: float                # share of candidates to pick
    check_layer: int
    documents: list             # (start, end) token span of each reused document, in prompt order

    @property
    def budget(self) -> int:
        """How many candidates the ratio allows."""
        return int(math.ceil(self.ratio * self.candidates.numel() - 1e-9))

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Sorted positions: the top ``ratio`` share of candidates by ``scores`` ([candidates]),
        plus every must-compute token."""
        k = self.budget
        keep = self.must.clone()
        if k >= self.candidates.numel():
            keep[self.candidates] = True
        elif k > 0:
            keep[self.candidates[torch.topk(scores, k, sorted=False).indices]] = True
        return self.runner.all_positions[keep]


@dataclass
class Selection:
    positions: torch.Tensor     # sorted positions that run from ``first_layer`` to the last layer
    hidden: torch.Tensor        # their inputs to ``first_layer``: [len(positions), hidden]
    first_layer: int


def question_scores(ctx: SelectionContext, per_layer: bool = False) -> torch.Tensor:
    """The question probe: the tokens without stored KV (question, text between documents) and
    the last token run every layer over the reused KV while the attention the question's rows pay
    each key is summed over heads and layers: [N], or [layers, N] with ``per_layer``."""
    runner = ctx.runner
    probe = runner.all_positions[ctx.unstored]
    rows = probe > int(runner.all_positions[ctx.reused].max())
    if not bool(rows.any()):           # the prompt ends with a document
        rows = probe == probe[-1]
    n = runner.all_positions.numel()
    scores = torch.zeros((runner.num_layers, n) if per_layer else (n,), dtype=torch.float32, device=probe.device)
    meta = runner.metadata(probe, scores[0] if per_layer else scores, rows)
    hidden = runner.embeddings[probe]
    for layer_idx in range(runner.num_layers):
        if per_layer:
            meta.scores = scores[layer_idx]
        hidden = runner.run(layer_idx, hidden, meta)
    return scores


def question_attention(ctx: SelectionContext) -> Selection:
    """Rank reused tokens by the question's attention (:func:`question_scores`); the top share
    then runs every layer.

    Sink tokens stay out of the probe: their stored KV serve the ranking as well as recomputed
    ones, and leaving them out shortens the probe without changing top-1 or KL on the benchmark
    (docs/benchmarks.md)."""
    with phase("probe"):
        selected = ctx.choose(question_scores(ctx)[ctx.candidates])
    return Selection(selected, ctx.runner.embeddings[selected], 0)


def _up_to_check_layer(ctx: SelectionContext):
    """Every token through the layers before the check layer: (check layer, pass state, hidden)."""
    runner = ctx.runner
    check = min(ctx.check_layer, runner.num_layers - 1)
    meta = runner.metadata(runner.all_positions)
    hidden = runner.embeddings
    for layer_idx in range(check):
        hidden = runner.run(layer_idx, hidden, meta)
    return check, meta, hidden


def _squared_deviation(fresh: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per token, over heads and channels: [kv_heads, T, d] x2 -> [T]."""
    return (fresh.float() - stored.float()).pow(2).sum(dim=(0, 2))


def value_deviation(ctx: SelectionContext) -> Selection:
    """CacheBlend: every token runs up to the check layer; the reused tokens whose V there deviates
    most from the stored V are recomputed. Only V of the candidates is needed to rank them, so
    their attention and MLP at the check layer are skipped (tested: same selection)."""
    check, _, hidden = _up_to_check_layer(ctx)
    fresh = ctx.runner.values_at(check, hidden[ctx.candidates])
    selected = ctx.choose(_squared_deviation(fresh, ctx.runner.values[check][:, ctx.candidates]))
    return Selection(selected, hidden[selected], check)


def key_deviation(ctx: SelectionContext) -> Selection:
    """Like :func:`value_deviation` with K, which needs RoPE, so the check layer runs in full."""
    check, meta, hidden = _up_to_check_layer(ctx)
    stored = ctx.runner.keys[check][:, ctx.candidates].clone()
    hidden = ctx.runner.run(check, hidden, meta)
    selected = ctx.choose(_squared_deviation(ctx.runner.keys[check][:, ctx.candidates], stored))
    return Selection(selected, hidden[selected], check + 1)


Rule = Callable[[SelectionContext], Selection]

SELECTION_RULES.update({
    "attention": question_attention,
    "value": value_deviation,
    "key": key_deviation,
})
