"""The reuse half of a prefill: what a stored entry must look like for a model
(:func:`model_entry_check`), and a prompt's stored documents fetched, checked and blended
(:func:`reuse_prefill`).

The engine decides whether to reuse (its strategy), holds the lock and the clock (TTFT) and fills
the :class:`~kvboost_rag.prefill.forward.PrefillStats`; the steps from the store to the blended
logits are here, as free functions over explicit inputs like those of :mod:`.forward`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from kvboost_rag.blend import BlendConfig, BlendResult
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.rope import RopeRotator
from kvboost_rag.models.adapters import ModelAdapter
from kvboost_rag.phases import phase
from kvboost_rag.prefill.assemble import EntryCheck, ModelShape, Placed, PrefixCache, fetch_documents
from kvboost_rag.prefill.forward import ShouldStop, blended_prefill, check_stop
from kvboost_rag.prompt.segments import TokenizedPrompt
from kvboost_rag.store.memory import KVStore

__all__ = ["model_entry_check", "reuse_prefill"]


def model_entry_check(model, adapter: ModelAdapter, context_window: int) -> EntryCheck:
    """The :class:`~kvboost_rag.prefill.assemble.EntryCheck` of ``model``: its KV shapes, its
    context window, and its layer-0 values, computed on the device the model is on at the time."""
    layers = adapter.layers(model)
    cfg = model.config
    shape = ModelShape(layers=len(layers), kv_heads=int(getattr(cfg, "num_key_value_heads", None)
                                                      or cfg.num_attention_heads),
                       head_dim=int(layers[0].self_attn.head_dim), context_window=context_window)

    def layer0_values(ids: Sequence[int]) -> torch.Tensor:
        device = model.get_input_embeddings().weight.device
        hidden = adapter.embed(model, torch.tensor(list(ids), device=device))
        return adapter.project_values(layers[0], hidden)

    return EntryCheck(shape, layer0_values)


def reuse_prefill(model, adapter: ModelAdapter, input_ids: torch.Tensor, tokenized: TokenizedPrompt, *,
                  store: KVStore, keys_of: Callable[[Sequence[int]], Sequence[str]], fingerprint: str,
                  entry_check: EntryCheck, key_of: Callable[[KVChunk], str], prefix_cache: Optional[PrefixCache],
                  rotator: RopeRotator, blend: BlendConfig, should_stop: ShouldStop, reuse: bool = True,
                  ) -> tuple[list[Placed], Optional[KVChunk], Optional[BlendResult]]:
    """``(found, prefix, result)`` for a prompt: ``found`` its stored documents that passed
    ``entry_check`` (:func:`~kvboost_rag.prefill.assemble.fetch_documents`; nothing is fetched
    when ``reuse`` is false), ``prefix`` the prefix cache's KV of the text before them, ``result``
    the blended prefill over both, or None when no document was usable.

    Logits that come out non-finite mean a fetched chunk holds a NaN or infinity the fetch sample
    did not reach: the chunks that hold one are dropped (:meth:`EntryCheck.drop_non_finite`,
    ``key_of`` naming each chunk's store key) and the blend runs again without them."""
    with phase("fetch"):
        found = fetch_documents(store, tokenized, keys_of, fingerprint, entry_check) if reuse else []
    check_stop(should_stop, "after fetching the stored documents")
    prefix = result = None
    if found:
        prefix = prefix_cache.fetch(tokenized) if prefix_cache is not None else None
        result = blended_prefill(model, adapter, input_ids, found, prefix, rotator, blend, should_stop=should_stop)
        if not bool(torch.isfinite(result.logits).all()):  # a NaN the fetch sample missed poisons every logit
            kept = entry_check.drop_non_finite(found, key_of)
            if len(kept) < len(found):
                found = kept
                result = (blended_prefill(model, adapter, input_ids, found, prefix, rotator, blend,
                                          should_stop=should_stop) if found else None)
    return found, prefix, result
