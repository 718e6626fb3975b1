"""CacheBlend: repair reused KV with a layer-wise selective recompute, never a full forward.

The prompt is laid out as [text][doc 1][text][doc 2]...[question]. Documents found in the store
arrive with re-rotated KV ("reused" tokens); every other token is "fresh" and always computed.

1. A selection rule (:mod:`.selection`) picks which reused tokens to recompute: the top
   ``recompute_ratio`` share by its ranking, plus every fresh token, the first ``sink_tokens`` of
   each document and the last token. The default rule ranks by the question's attention; CacheBlend's
   own rule (``selection="value"``) by V deviation at a check layer. ``strategy="cacheblend"``
   names the mechanism (CacheBlend's layer-wise selective recompute), whichever rule ranks.
2. The selected tokens run every remaining layer (:mod:`.layers`). Their queries attend over the
   full blended K/V of all tokens (:mod:`.attention`, masked by absolute position), and their
   fresh K/V are written into it.
3. The last token's final hidden state gives the first answer token's logits.

At ratio 1.0 every token runs every layer and the result equals a full prefill to float rounding
(tested for every model family).

Layout: :class:`BlendConfig` and the rule registry :data:`SELECTION_RULES` live in
:mod:`kvboost_rag.config`; :mod:`.attention` (the attention function and its per-request
:class:`~.attention.BlendMetadata`), :mod:`.layers` (the layer runner), :mod:`.selection` (the
rules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvboost_rag.models.adapters import ModelAdapter
from kvboost_rag.phases import phase
from kvboost_rag.blend.layers import LayerRunner
from kvboost_rag.blend.selection import Selection, SelectionContext
from kvboost_rag.config import SELECTION_RULES, BlendConfig

__all__ = ["BlendConfig", "BlendResult", "LayerRunner", "SELECTION_RULES", "blend"]


@dataclass
class BlendResult:
    logits: torch.Tensor        # first answer token's logits, [vocab], float32
    keys: torch.Tensor          # blended K, [layers, kv_heads, N, head_dim]
    values: torch.Tensor
    recomputed_tokens: int      # reused tokens recomputed
    fresh_tokens: int           # tokens with no stored KV (always computed)
    selected: torch.Tensor      # positions run through the last layer


@torch.inference_mode()
def blend(model, adapter: ModelAdapter, input_ids: torch.Tensor, reused: torch.Tensor, keys: torch.Tensor,
          values: torch.Tensor, config: BlendConfig, documents: Optional[list[tuple[int, int]]] = None,
          exact: Optional[torch.Tensor] = None) -> BlendResult:
    """Selective recompute over assembled KV.

    input_ids: [N] prompt ids. reused: [N] bool, True where ``keys``/``values`` hold stored
    (re-rotated) KV. keys/values: [layers, kv_heads, N, head_dim] buffers, written in place.
    documents: (start, end) token span of each reused document (sinks; rules may budget per document).
    exact: [N] bool, reused tokens whose stored KV is already what a full prefill computes (a
    cached prompt prefix): never candidates for recompute.
    """
    n = input_ids.shape[0]
    runner = LayerRunner(model, adapter, input_ids, keys, values, config.block_size)
    unstored = ~reused                  # no stored KV: always computed
    fresh_tokens = int(unstored.sum())
    unstored[n - 1] = True              # the last token's final hidden state gives the first answer token
    must = unstored.clone()
    documents = sorted(documents or [])
    for start, _end in documents if config.sink_tokens else []:
        must[start: start + config.sink_tokens] = True
    stale = reused if exact is None else reused & ~exact   # stored KV that is not already exact
    recomputable = stale & ~must
    if config.reused_key_scale != 1.0:
        keys[:, :, stale] *= config.reused_key_scale
    ctx = SelectionContext(runner, reused, unstored, must, runner.all_positions[recomputable],
                           config.recompute_ratio, config.check_layer, documents)

    if ctx.ratio in (0.0, 1.0) or ctx.candidates.numel() == 0:
        # Nothing to rank, so no probe and no check layer: reuse only (the stored KV stand as they
        # are and only the must-compute tokens run) or every candidate recomputed.
        positions = ctx.choose(torch.zeros(ctx.candidates.numel(), device=input_ids.device))
        selection = Selection(positions, runner.embeddings[positions], 0)
    else:
        selection = SELECTION_RULES[config.selection](ctx)

    with phase("selected_layers"):
        hidden = runner.run_layers(selection.first_layer, selection.hidden, runner.metadata(selection.positions))
    recomputed = int(reused[selection.positions].sum())
    with phase("logits"):
        logits = runner.logits(hidden[-1])
    return BlendResult(logits, keys, values, recomputed, fresh_tokens, selection.positions)
