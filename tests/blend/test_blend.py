"""Correctness of the blend against the exact path (a full prefill), on tiny random models."""
from __future__ import annotations

import pytest
import torch

from kvboost_rag import Segment
from kvboost_rag.models.adapters import adapter_for
from kvboost_rag.prefill.assemble import assemble, fetch_documents
from kvboost_rag.blend import SELECTION_RULES, LayerRunner

from kvboost_rag.testing.models import DOCS, tiny_engine

ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma"]



def _record_selections(monkeypatch) -> list:
    """The ``selected`` tokens of every blend the engine runs from now on, in order."""
    from kvboost_rag.prefill import forward as prefill_mod

    selections: list = []
    original = prefill_mod.blend

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        selections.append(result.selected)
        return result

    monkeypatch.setattr(prefill_mod, "blend", spy)
    return selections

def _prompt(engine, order):
    return ([Segment.text("<|im_start|>user\nRead these.\n\n")]
            + [s for i in order for s in (Segment.document(DOCS[i]), Segment.text("\n\n"))]
            + [Segment.text("Question: which city has the Colosseum?<|im_end|>\n<|im_start|>assistant\n")])


def _runner(model, ids, keys, values, block_size):
    return LayerRunner(model, adapter_for(model), ids, keys, values, block_size)


def _random_buffers(n: int, seed: int):
    """A tiny llama model, ``n`` random prompt ids and random blend buffers (K, V) for it."""
    model = tiny_engine("llama").model
    torch.manual_seed(seed)
    ids = torch.randint(5, 300, (n,))
    shape = (len(model.model.layers), model.config.num_key_value_heads, n, model.config.head_dim)
    return model, ids, torch.randn(shape), torch.randn(shape)


def _max_kv_diff(a, b):
    return max(max((la.keys - lb.keys).abs().max().item(), (la.values - lb.values).abs().max().item())
               for la, lb in zip(a.cache.layers, b.cache.layers))


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_ratio_one_equals_full_prefill(kind):
    engine = tiny_engine(kind)
    engine.warm(DOCS)
    prompt = _prompt(engine, [2, 0, 3, 1])  # reordered relative to warm order
    full = engine.prefill(prompt, strategy="full")
    blended = engine.prefill(prompt, strategy="cacheblend", recompute_ratio=1.0)
    assert blended.stats.reused_tokens == 0 and blended.stats.recomputed_tokens > 0
    assert blended.input_ids == full.input_ids
    assert _max_kv_diff(full, blended) <= 1e-4
    assert (full.logits - blended.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("selection", ["value", "key", "attention"])
def test_ratio_one_skips_ranking_and_equals_full_prefill(selection, monkeypatch):
    """At ratio 1.0 every token is recomputed, so neither the probe nor the check layer runs."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("a ranking pass ran at ratio 1.0")

    for name in SELECTION_RULES:
        monkeypatch.setitem(SELECTION_RULES, name, must_not_run)
    engine = tiny_engine("llama", selection=selection)
    engine.warm(DOCS)
    prompt = _prompt(engine, [1, 3, 2, 0])
    full = engine.prefill(prompt, strategy="full")
    blended = engine.prefill(prompt, recompute_ratio=1.0)
    assert blended.stats.reused_tokens == 0
    assert _max_kv_diff(full, blended) <= 1e-4
    assert (full.logits - blended.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("selection", ["value", "key", "attention"])
def test_partial_ratio_recomputes_the_requested_share(kind, selection):
    engine = tiny_engine(kind, selection=selection, sink_tokens=0)
    engine.warm(DOCS)
    prompt = _prompt(engine, [3, 1, 2, 0])
    pre = engine.prefill(prompt, strategy="cacheblend", recompute_ratio=0.3)
    cached = pre.stats.reused_tokens + pre.stats.recomputed_tokens
    assert pre.stats.recomputed_tokens == pytest.approx(0.3 * cached, abs=2)
    assert pre.stats.prompt_tokens == cached + pre.stats.fresh_tokens


def test_reuse_equals_full_when_document_follows_its_encoding_preamble():
    engine = tiny_engine("llama")
    engine.warm(DOCS[:1])
    prompt = [Segment.text(engine.preamble_text), Segment.document(DOCS[0]), Segment.text("\nWhere is Paris?")]
    full = engine.prefill(prompt, strategy="full")
    reuse = engine.prefill(prompt, strategy="reuse")
    assert reuse.stats.reused_tokens > 0
    assert _max_kv_diff(full, reuse) <= 1e-4
    assert (full.logits - reuse.logits).abs().max().item() <= 1e-4


def test_blocked_attention_equals_dense_attention():
    """The fast path (position-sorted query blocks that skip masked keys) vs one dense block."""
    engine = tiny_engine("llama")
    engine.warm(DOCS)
    prompt = _prompt(engine, [1, 3, 0, 2])
    results = []
    for block in (7, 1_000_000):
        engine.config = engine.config.replace(recompute_ratio=0.2, block_size=block)
        results.append(engine.prefill(prompt))
    assert _max_kv_diff(*results) <= 1e-5
    assert (results[0].logits - results[1].logits).abs().max().item() <= 1e-5


def test_block_plan_covers_every_query_once_and_never_costs_more_than_fixed_blocks():
    from kvboost_rag.blend.attention import plan_blocks

    torch.manual_seed(0)
    for n, count, max_block in ((3000, 350, 128), (3000, 40, 128), (500, 499, 64), (50, 1, 128), (9, 9, 4)):
        positions = sorted(torch.randperm(n)[:count].tolist())
        blocks = plan_blocks(positions, max_block)
        assert [i for b0, b1 in blocks for i in range(b0, b1)] == list(range(count))
        assert all(0 < b1 - b0 <= max_block for b0, b1 in blocks)

        def cost(bl):
            return sum(1 + (b1 - b0) * (positions[b1 - 1] + 1) / 40960 for b0, b1 in bl)
        fixed = [(i, min(i + max_block, count)) for i in range(0, count, max_block)]
        assert cost(blocks) <= cost(fixed) + 1e-9
    # queries bunched at the two ends of a long prompt: the early ones get their own block
    positions = list(range(10, 26)) + list(range(2900, 3012))
    assert plan_blocks(positions, 128)[0] == (0, 16)


def test_selected_token_never_attends_to_a_later_position():
    """Planted case: garbage K/V at positions between two selected tokens of one block must not
    change the earlier token's output (a bottom-right aligned mask would let it see them)."""
    engine = tiny_engine("llama")
    model = engine.model
    n = 40
    ids = torch.randint(5, 300, (n,))
    layers, heads, dim = len(model.model.layers), model.config.num_key_value_heads, 16
    torch.manual_seed(1)
    keys = torch.randn(layers, heads, n, dim)
    values = torch.randn(layers, heads, n, dim)
    positions = torch.tensor([5, 30])
    runner = _runner(model, ids, keys.clone(), values.clone(), block_size=64)  # both tokens in one query block
    hidden = runner.embeddings[positions]
    out1 = runner.run(1, hidden, runner.metadata(positions))
    k2, v2 = keys.clone(), values.clone()
    k2[:, :, 6:30] = 50.0
    v2[:, :, 6:30] = 1e3
    out2 = _runner(model, ids, k2, v2, block_size=64).run(1, hidden, runner.metadata(positions))
    assert torch.allclose(out1[0], out2[0], atol=1e-6), "token at position 5 saw a later key"
    assert not torch.allclose(out1[1], out2[1]), "token at position 30 should see positions 6..29"


def test_probe_attention_with_scores_equals_the_fused_kernel_and_dense_probabilities():
    """The probe path (the fused kernel for the outputs, a second QK product of the question rows
    for the scores) vs the plain pass for the outputs, and vs a dense softmax computed here for the
    scores, on scattered positions."""
    model, ids, keys, values = _random_buffers(n := 50, seed=3)
    heads, dim = model.config.num_key_value_heads, 16
    positions = torch.tensor([2, 9, 10, 17, 30, 31, 44, 45])
    rows = torch.tensor([False, True, False, True, True, False, True, True])
    runner = _runner(model, ids, keys.clone(), values.clone(), block_size=4)  # several query blocks
    hidden = runner.embeddings[positions]
    plain = runner.run(1, hidden, runner.metadata(positions))
    scores = torch.zeros(n)
    k1, v1 = keys.clone(), values.clone()
    probed = _runner(model, ids, k1, v1, block_size=4).run(1, hidden, runner.metadata(positions, scores, rows))
    assert (plain - probed).abs().max().item() <= 1e-5
    # dense reference for the scores from the K written by the layer and the layer's own queries
    attn = model.model.layers[1].self_attn
    normed = model.model.layers[1].input_layernorm(hidden.unsqueeze(0))
    q = attn.q_proj(normed).view(1, len(positions), -1, dim).transpose(1, 2)
    cos, sin = runner.cos[positions].unsqueeze(0), runner.sin[positions].unsqueeze(0)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k = k1[1].repeat_interleave(q.shape[1] // heads, dim=0)  # [heads, n, dim]
    logits = torch.einsum("hsd,hkd->hsk", q[0], k) * dim ** -0.5
    logits.masked_fill_(torch.arange(n)[None, None, :] > positions[None, :, None], float("-inf"))
    expected = torch.softmax(logits, dim=-1)[:, rows].sum(dim=(0, 1))
    assert torch.allclose(scores, expected, atol=1e-5)
    assert scores[positions[-1] + 1:].abs().max().item() == 0 and abs(scores.sum().item() - q.shape[1] * int(rows.sum())) < 1e-3


def test_low_precision_probe_scores_match_the_float32_probe():
    """bfloat16 takes the other probe path (fused kernel + a second product of the question rows
    in bfloat16): its scores and outputs stay within bfloat16 rounding of the float32 path's."""
    model, ids, keys, values = _random_buffers(n := 60, seed=4)
    positions = torch.tensor([3, 11, 12, 25, 40, 55, 56, 57, 58, 59])
    rows = positions >= 55
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        runner = _runner(m, ids, keys.to(dtype), values.to(dtype), block_size=4)
        scores = torch.zeros(n)
        out = runner.run(1, runner.embeddings[positions], runner.metadata(positions, scores, rows))
        results.append((out.float(), scores))
    model.to(torch.float32)
    (out32, s32), (out16, s16) = results
    assert s16.dtype == torch.float32 and abs(s16.sum().item() - s32.sum().item()) < 1e-2
    assert (s16 - s32).abs().max().item() <= 0.05 * s32.abs().max().item()
    assert (out16 - out32).abs().max().item() <= 0.05 * out32.abs().max().item()


@pytest.mark.parametrize("selection", ["key", "value"])
def test_deviation_rules_pick_the_tokens_whose_kv_deviates_most(selection, monkeypatch):
    """CacheBlend's rule against a reference computed here: at the check layer (1) every token's
    fresh K/V equal a full prefill's (layer 0 is exact for stored tokens), so the rule must pick
    exactly the top share of reused tokens by squared deviation of the full prefill's K (V) from
    the stored, re-rotated K (V). Sinks are off, so nothing else is selected."""
    engine = tiny_engine("llama", selection=selection, sink_tokens=0, prefix_cache_bytes=0)
    engine.warm(DOCS)
    prompt = _prompt(engine, [2, 3, 1, 0])
    selections = _record_selections(monkeypatch)
    pre = engine.prefill(prompt, recompute_ratio=0.3)
    tokenized = engine.tokenize(prompt)
    n = len(tokenized)
    found = fetch_documents(engine.store, tokenized, engine.lookup_keys, engine.fingerprint)
    keys, values, reused = assemble(n, found, engine.rotator, torch.float32, torch.device("cpu"))
    full = engine.prefill(prompt, strategy="full").cache.layers[1]
    fresh, stored = (full.keys[0], keys[1]) if selection == "key" else (full.values[0], values[1])
    candidates = torch.arange(n)[reused]
    candidates = candidates[candidates != n - 1]
    deviation = (fresh[:, candidates] - stored[:, candidates]).pow(2).sum(dim=(0, 2))
    k = pre.stats.recomputed_tokens
    assert 0 < k < candidates.numel()
    expected = set(candidates[torch.topk(deviation, k).indices].tolist())
    chosen = set(selections[0].tolist()) & set(candidates.tolist())
    assert chosen == expected


def test_missing_documents_are_fresh_tokens():
    engine = tiny_engine("llama")
    engine.warm(DOCS[:2])
    pre = engine.prefill(_prompt(engine, [0, 1, 2]), strategy="reuse")
    doc2 = len(engine.tokenize_document(DOCS[2]))
    assert pre.stats.documents_reused == 2
    assert pre.stats.fresh_tokens >= doc2


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_attention_guided_selection(kind):
    engine = tiny_engine(kind, selection="attention", sink_tokens=0)
    engine.warm(DOCS)
    prompt = _prompt(engine, [1, 0, 3, 2])
    full = engine.prefill(prompt, strategy="full")
    exact = engine.prefill(prompt, recompute_ratio=1.0)
    assert (full.logits - exact.logits).abs().max().item() <= 1e-4
    assert _max_kv_diff(full, exact) <= 1e-4
    part = engine.prefill(prompt, recompute_ratio=0.25)  # the prefix now comes from the prefix cache
    cached = part.stats.reused_tokens + part.stats.recomputed_tokens - part.stats.prefix_cached_tokens
    assert part.stats.recomputed_tokens == pytest.approx(0.25 * cached, abs=2)
    reuse = engine.prefill(prompt, strategy="reuse")
    # recomputing a quarter of the tokens moves the answer distribution toward the full prefill
    assert (part.logits - full.logits).abs().max() < (reuse.logits - full.logits).abs().max()


def test_question_probe_runs_only_tokens_without_stored_kv(monkeypatch):
    """The probe that ranks reused tokens runs the question and the text between documents,
    not the documents' sink tokens; the sinks are still recomputed by the blend itself."""
    engine = tiny_engine("llama", selection="attention", sink_tokens=4)
    engine.warm(DOCS)
    prompt = _prompt(engine, [2, 0, 3, 1])
    engine.prefill(prompt)  # fills the prefix cache
    probed = []
    run = LayerRunner.run

    def spy(self, layer_idx, hidden, meta):
        if meta.scores is not None and layer_idx == 0:
            probed.append(meta.positions.numel())
        return run(self, layer_idx, hidden, meta)

    monkeypatch.setattr(LayerRunner, "run", spy)
    pre = engine.prefill(prompt, recompute_ratio=0.2)
    assert probed == [pre.stats.fresh_tokens]
    assert pre.stats.recomputed_tokens >= 4 * 4  # 4 documents x 4 sinks


@pytest.mark.parametrize("selection", ["attention", "value"])
def test_prompt_ending_with_a_document(selection, monkeypatch):
    """The last token gives the first answer token, so it is computed even when it is a
    document's; at ratio 1.0 the result still equals a full prefill."""
    engine = tiny_engine("llama", selection=selection)
    engine.warm(DOCS)
    prompt = [Segment.text("<|im_start|>user\nRead these.\n\n"), Segment.document(DOCS[1]),
              Segment.text("\n\n"), Segment.document(DOCS[0])]
    full = engine.prefill(prompt, strategy="full")
    exact = engine.prefill(prompt, recompute_ratio=1.0)
    assert _max_kv_diff(full, exact) <= 1e-4
    assert (full.logits - exact.logits).abs().max().item() <= 1e-4
    selections = _record_selections(monkeypatch)
    part = engine.prefill(prompt, recompute_ratio=0.3)
    reuse = engine.prefill(prompt, strategy="reuse")
    assert part.stats.documents_reused == 2 and part.stats.recomputed_tokens > 0
    last = len(part.input_ids) - 1
    # the logits come from the last selected token's final hidden state: it must be the last one
    assert [int(s[-1]) for s in selections] == [last, last]
    assert torch.isfinite(part.logits).all()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cached_prefix_is_reused_exactly(kind):
    """The text before the first document is computed once, then served from the prefix cache:
    at ratio 1.0 the result still equals a full prefill, and the prefix counts as reused."""
    engine = tiny_engine(kind)
    engine.warm(DOCS)
    prompt = _prompt(engine, [1, 3, 0])
    prefix_len = engine.tokenize(prompt).documents[0][0]
    first = engine.prefill(prompt, recompute_ratio=1.0)
    assert first.stats.prefix_cached_tokens == 0
    full = engine.prefill(prompt, strategy="full")
    again = engine.prefill(prompt, recompute_ratio=1.0)
    assert again.stats.prefix_cached_tokens == prefix_len > 0
    assert again.stats.reused_tokens == prefix_len
    assert _max_kv_diff(full, again) <= 1e-4
    assert (full.logits - again.logits).abs().max().item() <= 1e-4


def test_prefix_cache_does_not_change_a_partial_blend():
    cached, uncached = tiny_engine("llama"), tiny_engine("llama", prefix_cache_bytes=0)
    for e in (cached, uncached):
        e.warm(DOCS)
    prompt = _prompt(cached, [2, 0, 1])
    cached.prefill(prompt)  # fills the prefix cache
    hit, ref = cached.prefill(prompt), uncached.prefill(prompt)
    assert hit.stats.prefix_cached_tokens > 0 and ref.stats.prefix_cached_tokens == 0
    assert hit.stats.recomputed_tokens == ref.stats.recomputed_tokens
    assert hit.stats.fresh_tokens + hit.stats.prefix_cached_tokens == ref.stats.fresh_tokens
    assert _max_kv_diff(ref, hit) <= 1e-4
    assert (ref.logits - hit.logits).abs().max().item() <= 1e-4


def test_a_different_leading_text_misses_the_prefix_cache():
    engine = tiny_engine("llama")
    engine.warm(DOCS)
    engine.prefill(_prompt(engine, [0, 1]))
    other = [Segment.text("<|im_start|>user\nSomething else entirely.\n\n")] + _prompt(engine, [0, 1])[1:]
    assert engine.prefill(other).stats.prefix_cached_tokens == 0
    assert engine.prefill(other).stats.prefix_cached_tokens > 0


def test_reused_key_scale_touches_only_stale_kv():
    """The APE-style temperature on stale keys: at ratio 1.0 every reused token is recomputed, so
    the result is still a full prefill's; below it, the answer distribution changes."""
    engine = tiny_engine("llama", reused_key_scale=1.3)
    plain = tiny_engine("llama")
    for e in (engine, plain):
        e.warm(DOCS)
    prompt = _prompt(engine, [3, 0, 2, 1])
    full = engine.prefill(prompt, strategy="full")
    exact = engine.prefill(prompt, recompute_ratio=1.0)
    assert _max_kv_diff(full, exact) <= 1e-4
    assert (full.logits - exact.logits).abs().max().item() <= 1e-4
    scaled, unscaled = engine.prefill(prompt, strategy="reuse"), plain.prefill(prompt, strategy="reuse")
    assert (scaled.logits - unscaled.logits).abs().max().item() > 1e-3
