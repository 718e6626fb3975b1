"""Run a set of tokens (scattered positions) through one decoder layer over the blended K/V.

The layer's math is the model's own (through its family adapter, :mod:`kvboost_rag.models.adapters`);
what changes is where K/V live: the tokens' fresh K/V are written at their absolute positions in
the blend buffer, then their queries attend over the whole buffer
(:func:`kvboost_rag.blend.attention.blended_attention`). Writing every running token before
attention is exact: a query only ever sees keys at positions <= its own.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvboost_rag.models.adapters import ModelAdapter
from kvboost_rag.phases import phase
from kvboost_rag.blend.attention import BlendMetadata, blended_attention


class LayerRunner:
    """Holds what every layer call of one prompt shares: embeddings and RoPE cos/sin of all
    positions, the blend buffers, the model and its adapter."""

    def __init__(self, model, adapter: ModelAdapter, input_ids: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, block_size: int) -> None:
        self.model, self.adapter = model, adapter
        self.layers = adapter.layers(model)
        self.num_layers = len(self.layers)
        self.keys, self.values = keys, values          # [layers, kv_heads, N, d], written in place
        self.block_size = block_size
        n = input_ids.shape[0]
        self.all_positions = torch.arange(n, device=input_ids.device)
        self.embeddings = adapter.embed(model, input_ids)                  # [N, hidden]
        self.cos, self.sin = adapter.rotary_cos_sin(model, self.embeddings, n)

    def metadata(self, positions: torch.Tensor, scores: Optional[torch.Tensor] = None,
                 score_rows: Optional[torch.Tensor] = None) -> BlendMetadata:
        """Per-pass state for running the tokens at ``positions`` (see :class:`BlendMetadata`)."""
        return BlendMetadata(positions, self.block_size, scores, score_rows)

    def run(self, layer_idx: int, hidden: torch.Tensor, meta: BlendMetadata) -> torch.Tensor:
        """hidden: [S, hidden] inputs of the tokens at ``meta.positions``; returns their outputs."""
        layer = self.layers[layer_idx]
        positions = meta.positions
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        scale = self.adapter.scaling(layer)

        def attend(q, k, v):
            keys.index_copy_(1, positions, k[0].to(keys.dtype))
            values.index_copy_(1, positions, v[0].to(values.dtype))
            with phase("attention"):
                return blended_attention(q, keys, values, scale, meta)

        if meta.cos_sin is None:   # the tokens' RoPE cos/sin: gathered once per pass, not per layer
            meta.cos_sin = (self.cos[positions], self.sin[positions])
        return self.adapter.layer_forward(layer, hidden, *meta.cos_sin, attend)

    def run_layers(self, first_layer: int, hidden: torch.Tensor, meta: BlendMetadata) -> torch.Tensor:
        """Run layers ``first_layer .. L-1``; returns the tokens' final hidden states."""
        for layer_idx in range(first_layer, self.num_layers):
            hidden = self.run(layer_idx, hidden, meta)
        return hidden

    def values_at(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """V [kv_heads, S, d] of ``hidden`` at ``layer_idx``, without attention or the MLP."""
        return self.adapter.project_values(self.layers[layer_idx], hidden)

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(self.model, last_hidden)
