"""The in-place decode cache against transformers' own DynamicCache (the exact path)."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kvboost_rag.kv.decode_cache import InPlaceLayer, with_room
from kvboost_rag.decode.loop import SamplingParams, decode
from kvboost_rag.kv.hf_compat import cache_kwargs

from kvboost_rag.testing.models import tiny_engine, tiny_model, tiny_tokenizer


def _kv(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, tokens, 8, generator=g), torch.randn(2, 2, tokens, 8, generator=g)


def test_in_place_layer_matches_dynamic_layer_through_growth_crop_and_reorder():
    reference, layer = DynamicLayer(), InPlaceLayer.adopt(*_kv(5, 0), room=2)
    reference.update(*_kv(5, 0))
    steps = [("update", 1), ("update", 1), ("update", 3), ("crop", -2), ("update", 1), ("reorder", None),
             ("update", 2)]
    for i, (op, arg) in enumerate(steps):
        if op == "update":
            k, v = _kv(arg, i + 1)
            out_ref, out = reference.update(k, v), layer.update(k, v)
            assert torch.equal(out_ref[0], out[0]) and torch.equal(out_ref[1], out[1])
        elif op == "crop":
            reference.crop(arg)
            layer.crop(arg)
        else:
            reference.reorder_cache(torch.tensor([1, 0]))  # beam search swaps the batch rows
            layer.reorder_cache(torch.tensor([1, 0]))
        assert layer.get_seq_length() == reference.get_seq_length()
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)


def test_appends_within_room_write_into_the_same_buffer():
    layer = InPlaceLayer.adopt(*_kv(4, 0), room=3)
    start = layer.keys.data_ptr()
    for i in range(3):
        layer.update(*_kv(1, i + 1))
        assert layer.keys.data_ptr() == start and layer.get_seq_length() == 5 + i
    layer.update(*_kv(1, 9))  # past the room: moved once into a larger buffer
    assert layer.keys.data_ptr() != start and layer.get_seq_length() == 8


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoding_with_room_equals_decoding_with_dynamic_cache(kind):
    model, tokenizer = tiny_model(kind), tiny_tokenizer()
    ids = torch.tensor([tokenizer.encode("Paris is the capital of France. Question: where is Paris?")])
    out = model(input_ids=ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[0, -1]

    # exact path: transformers' DynamicCache, one torch.cat per token
    ref_cache = DynamicCache()
    for i, layer in enumerate(cache.layers):
        ref_cache.update(layer.keys.clone(), layer.values.clone(), i)
    ref_tokens, ref_logits, step_logits, position = [], [], logits, ids.shape[1]
    with torch.inference_mode():
        for _ in range(12):
            token = int(step_logits.argmax())
            ref_tokens.append(token)
            o = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]),
                      use_cache=True, **cache_kwargs(ref_cache))
            step_logits = o.logits[0, -1]
            ref_logits.append(step_logits)
            position += 1

    params = SamplingParams(13, 0.0, 1.0, 0, None, ())
    tokens = [t for t, _, reason in decode(model, tokenizer, cache, logits, ids.shape[1], params, eos_ids=set())]
    assert tokens[:12] == ref_tokens
    assert all(isinstance(layer, InPlaceLayer) for layer in cache.layers)
    for ref_layer, layer in zip(ref_cache.layers, cache.layers):
        assert torch.allclose(layer.keys, ref_layer.keys, atol=1e-6)
        assert torch.allclose(layer.values, ref_layer.values, atol=1e-6)


def test_engine_answers_are_unchanged_by_the_in_place_cache(monkeypatch):
    """A blended answer decoded with the in-place cache equals one decoded with plain cat growth."""
    from kvboost_rag.decode import loop as generate_mod

    from kvboost_rag.testing.models import DOCS
    engine = tiny_engine("llama")
    engine.warm(DOCS)
    prompt = "<|im_start|>user\n" + "\n\n".join(DOCS[::-1]) + "\nWhere is Rome?<|im_end|>\n<|im_start|>assistant\n"
    fast = engine.generate(prompt, max_new_tokens=16)
    monkeypatch.setattr(generate_mod, "with_room", lambda cache, room: cache)
    plain = engine.generate(prompt, max_new_tokens=16)
    assert fast.token_ids == plain.token_ids and len(fast.token_ids) > 0


def test_with_room_leaves_other_layer_kinds_alone():
    cache = DynamicCache()
    cache.update(*_kv(3, 0), 0)
    cache.layers.append(InPlaceLayer.adopt(*_kv(3, 1), room=1))
    kept = cache.layers[1]
    with_room(cache, 4)
    assert isinstance(cache.layers[0], InPlaceLayer) and cache.layers[1] is kept
