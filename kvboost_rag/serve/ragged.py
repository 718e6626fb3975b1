"""One decode step for a whole batch: every row at its own position, attending its own keys.

:func:`batched_step` runs one forward for every row of a :class:`~kvboost_rag.kv.batch.BatchKV`:
row ``b`` feeds its last token at position ``lengths[b]`` and writes its K/V at that slot. SDPA
models attend **row by row over each row's own keys** (:func:`_ragged_attention`, registered with
transformers as :data:`RAGGED_ATTENTION` and switched in for that forward only): the very SDPA
call the request alone runs, so each row's logits are those of its request alone, no padding is
read and grouped-query heads are not expanded. Eager models attend through the buffer's 4D
additive mask. Flash-attention kernels take no explicit mask: such models are not batched
(:func:`supports`). Each row's logits then go to its request's own decode loop through a
:class:`RowModel` (with :data:`NO_CACHE`: the KV lives in the batch buffer). Design:
docs/architecture.md.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Optional

import torch

from kvboost_rag.kv.batch import BatchKV
from kvboost_rag.kv.hf_compat import cache_kwargs

__all__ = ["RAGGED_ATTENTION", "NO_CACHE", "RowModel", "batched_step", "register_ragged", "supports"]

RAGGED_ATTENTION = "kvboost_ragged"
_registered = False
_register_lock = threading.Lock()


def supports(model) -> bool:
    """Batched steps pass an explicit 4D additive mask: SDPA and eager attention take it (flash
    attention kernels do not; such models decode request by request)."""
    return getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


class _NoCache:
    """What a batched request's :func:`~kvboost_rag.decode.loop.decode` is handed as its cache:
    the real KV lives in the batch buffer."""

    layers: list = []


NO_CACHE = _NoCache()


class RowModel:
    """A stand-in for the model inside one request's :func:`~kvboost_rag.decode.loop.decode`
    generator: returns the logits the batched forward produced for this request's row."""

    def __init__(self) -> None:
        self.logits: Optional[torch.Tensor] = None

    def __call__(self, **_kwargs):
        logits, self.logits = self.logits, None
        if logits is None:  # pragma: no cover - a scheduler bug, never a user error
            raise RuntimeError("batched logits missing for this request")
        return SimpleNamespace(logits=logits.view(1, 1, -1))


def _ragged_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      kvboost_rows: Optional[list[int]] = None, **kwargs):
    """One decode step of a batch, attending each row over its own keys only.

    Registered as the attention implementation :data:`RAGGED_ATTENTION`, used only for the
    scheduler's batched steps of SDPA models. Row ``b`` (one query) runs the very SDPA call a
    request alone runs at that step, over ``key[b, :, :kvboost_rows[b]]``: no padding is read
    (a padded, masked call reads every row up to the longest and sums over the masked slots, so
    its float results differ in the last bits from the request alone), and grouped-query heads are
    not expanded. Without ``kvboost_rows`` (another caller while the implementation is switched)
    or with several queries it is transformers' own SDPA path with the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kvboost_rows is None or query.shape[2] != 1 or len(kvboost_rows) != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and not _gqa_without_mask(key, value)) or any(
            kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks")):
        # anything unusual: run transformers' path itself, row by row, as a request alone calls it
        outs = []
        for b, n in enumerate(kvboost_rows):
            row_kwargs = dict(kwargs)
            bias = kwargs.get("position_bias")
            if isinstance(bias, torch.Tensor):
                row_kwargs["position_bias"] = bias[b:b + 1 if bias.shape[0] > 1 else 1, ..., :n]
            outs.append(sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, :n], value[b:b + 1, :, :n],
                                               None, dropout=dropout, scaling=scaling, **row_kwargs)[0])
        return torch.cat(outs), None
    # What sdpa_attention_forward runs for one query without a mask (is_causal False, grouped heads
    # through enable_gqa), minus its per-call Python: this path runs rows x layers times a step.
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = {"enable_gqa": True} if groups > 1 else {}
    outs = [sdpa(query[b:b + 1], key[b:b + 1, :, :n], value[b:b + 1, :, :n], attn_mask=None,
                 dropout_p=dropout, scale=scaling, is_causal=False, **gqa)
            for b, n in enumerate(kvboost_rows)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)   # a lone row: no copy
    return out.transpose(1, 2).contiguous(), None


def _gqa_without_mask(key, value) -> bool:
    """Whether transformers' SDPA path uses ``enable_gqa`` for a call without a mask."""
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
    except ImportError:  # pragma: no cover - other transformers versions: take the exact path
        return False
    return bool(use_gqa_in_sdpa(None, key, value))


def register_ragged() -> bool:
    """Register :func:`_ragged_attention` with transformers (once); False if this version lacks
    the interfaces (the batch then attends through the padded mask)."""
    global _registered
    with _register_lock:
        if not _registered:
            try:
                from transformers import AttentionInterface
                from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
            except ImportError:  # pragma: no cover - older transformers
                return False
            AttentionInterface.register(RAGGED_ATTENTION, _ragged_attention)
            # a forward by another caller while a batched step has the implementation switched
            # still gets SDPA's usual mask
            AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)
            _registered = True
    return True


def batched_step(model, kv: BatchKV, ids: torch.Tensor, ragged: bool = True):
    """One forward for every row of ``kv``: row ``b`` feeds ``ids[b]`` at position ``kv.lengths[b]``
    and its K/V land at that slot; then the lengths advance. SDPA models (with ``ragged``) attend
    row by row over each row's own keys (:func:`_ragged_attention`), others through the padded
    mask. Call it under ``torch.inference_mode()`` and the engine's lock."""
    positions, mask = kv.step_inputs(kv.keys[0].dtype, ids.device)
    config = model.config
    previous = config._attn_implementation
    extra = {}
    if ragged and previous == "sdpa" and register_ragged():
        _set_attn(config, RAGGED_ATTENTION)  # restored below; other callers fall back to SDPA
        extra["kvboost_rows"] = kv.valid_lengths()
    try:
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, **cache_kwargs(kv),
                    use_cache=True, **extra)
    finally:
        if extra:
            _set_attn(config, previous)
    kv.advance()
    return out


def _set_attn(config, name: str) -> None:
    """Switch a config's attention implementation (the plain attribute where the config has no
    sub-configs: the property's setter walks them, and this runs on every batched step)."""
    if not getattr(config, "sub_configs", None) and hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name
