"""Re-rotation is exact: a stored document moved anywhere has the layer-0 K/V a fresh
computation at that position gives, for every RoPE flavour kvboost-rag accepts."""
from __future__ import annotations

import warnings

import pytest
import torch

from kvboost_rag import KVBoostEngine, Segment
from kvboost_rag.models.adapters import adapter_for
from kvboost_rag.kv.rope import RopeRotator

from kvboost_rag.testing.models import DOCS, tiny_model, tiny_tokenizer

ROPE_VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0},
}


def _engine(kind="llama", **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KVBoostEngine(tiny_model(kind, **overrides), tiny_tokenizer())


def _layer0_matches(engine, offset_text: str):
    engine.warm(DOCS[:1])
    prompt = [Segment.text(offset_text), Segment.document(DOCS[0]), Segment.text(" ok")]
    tokenized = engine.tokenize(prompt)
    start, end, _ = tokenized.documents[0]
    chunk = engine.store.get(engine.key_for_text(DOCS[0]), engine.fingerprint)
    full = engine.prefill(prompt, strategy="full")
    fresh_k = full.cache.layers[0].keys[0, :, start:end]
    fresh_v = full.cache.layers[0].values[0, :, start:end]
    moved_k = engine.rotator.rotate(chunk.keys[0], start - chunk.start)
    return (moved_k - fresh_k).abs().max().item(), (chunk.values[0] - fresh_v).abs().max().item(), start - chunk.start


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
@pytest.mark.parametrize("offset_text", ["x", "A much longer prefix pushes the document far to the right. " * 6])
def test_moved_document_has_exact_layer0_kv(variant, offset_text):
    engine = _engine(rope_parameters=dict(ROPE_VARIANTS[variant]))
    dk, dv, delta = _layer0_matches(engine, offset_text)
    assert delta != 0
    assert dk <= 1e-4 and dv <= 1e-5


def test_partial_rotary_rotates_only_rotary_channels():
    engine = _engine("llama")
    # A StableLM tiny model rotates only the first quarter of each head's channels.
    import transformers
    torch.manual_seed(0)
    cfg = transformers.StableLmConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      partial_rotary_factor=0.25, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = KVBoostEngine(model, tiny_tokenizer())
    assert engine.rotator.rotary_dim == 4  # 16-channel heads, 25% rotary
    dk, dv, _ = _layer0_matches(engine, "Some prefix text before the document. " * 3)
    assert dk <= 1e-4 and dv <= 1e-5


def test_rotation_composes_and_inverts():
    model = tiny_model("llama")
    rot = RopeRotator(adapter_for(model).inv_freq(model))
    k = torch.randn(2, 3, 5, 16)
    assert torch.allclose(rot.rotate(rot.rotate(k, 37), -37), k, atol=1e-5)
    assert torch.allclose(rot.rotate(rot.rotate(k, 10), 27), rot.rotate(k, 37), atol=1e-5)
    assert torch.equal(rot.rotate(k, 0), k)


def test_yarn_attention_scaling_is_not_applied_twice():
    engine = _engine(rope_parameters=dict(ROPE_VARIANTS["yarn"]))
    assert engine.model.model.rotary_emb.attention_scaling != 1.0
    k = torch.randn(1, 2, 4, 16)
    # a pure rotation preserves norms; applying the YaRN factor again would not
    assert torch.allclose(engine.rotator.rotate(k, 100).norm(dim=-1), k.norm(dim=-1), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_low_precision_rotation_is_as_exact_as_the_dtype_allows(dtype, rotary_fraction):
    """bfloat16/float16 keys rotate through one matmul (the fast path): the result is the exact
    rotation rounded once, and channels past the rotary dimension pass through unchanged."""
    model = tiny_model("llama")
    inv = adapter_for(model).inv_freq(model)
    inv = inv[: int(inv.numel() * rotary_fraction)]
    rot = RopeRotator(inv)
    torch.manual_seed(0)
    k = torch.randn(2, 3, 50, 16).to(dtype)
    for delta in (1, 37, -200, 4000):
        exact = rot.rotate(k.double(), delta)            # the float path, in float64
        fast = rot.rotate(k, delta)
        assert fast.dtype == dtype
        # each output channel mixes a channel and its rotary partner: the matrix entries and the
        # result are rounded once each, so the error stays within eps times their magnitudes
        half = rot.rotary_dim // 2
        partner = torch.cat([k[..., half:rot.rotary_dim], k[..., :half], torch.zeros_like(k[..., rot.rotary_dim:])], -1)
        bound = torch.finfo(dtype).eps * (k.double().abs() + partner.double().abs())
        assert ((fast.double() - exact).abs() <= bound + 1e-6).all(), delta
        assert torch.equal(fast[..., rot.rotary_dim:], k[..., rot.rotary_dim:])
