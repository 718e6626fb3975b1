"""How close is a reused/blended KV to a full prefill? Teacher-forced top-1 agreement and KL.

The reference answer is the full prefill's greedy continuation. Both caches are then fed the
same answer tokens (teacher forcing), so every position compares the next-token distributions
the two caches induce given an identical history; one early divergence cannot cascade.

torch is imported inside the functions: the benchmark's CLI imports this module and its
``--help`` should not pay for torch.
"""
from __future__ import annotations

from typing import Optional, Sequence

from kvboost_rag.kv.hf_compat import cache_kwargs


def kl_top1(ref_logits, logits) -> tuple[float, float]:
    """Teacher-forced fidelity of ``logits`` against reference ``ref_logits`` (both ``[T, V]``).

    Returns ``(mean over positions of KL(ref || other), fraction of positions whose argmax agree)``.
    Computed in float32."""
    import torch

    ref = ref_logits.detach().float().reshape(-1, ref_logits.shape[-1])
    oth = logits.detach().float().reshape(-1, logits.shape[-1]).to(ref.device)
    if ref.shape != oth.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(oth.shape)}")
    if ref.shape[0] == 0:
        raise ValueError("no positions to compare")
    log_p = torch.log_softmax(ref, dim=-1)
    log_q = torch.log_softmax(oth, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
    top1 = (ref.argmax(-1) == oth.argmax(-1)).float()
    return float(kl.mean()), float(top1.mean())


def greedy_reference(engine, prompt, n_tokens: int):
    """Full prefill, then greedy decode of up to ``n_tokens`` (stops after EOS).

    Returns the answer ids and the logits that predicted each of them (``[len(answer), vocab]``):
    exactly the teacher-forced logits of the full prefill over its own greedy answer."""
    import torch

    with torch.inference_mode():
        pre = engine.prefill(prompt, strategy="full", max_new_tokens=n_tokens)
        answer: list[int] = []
        rows = [pre.logits.float()]
        while True:
            token = int(rows[-1].argmax())
            answer.append(token)
            if token in engine.eos_ids or len(answer) == n_tokens:
                break
            position = len(pre.input_ids) + len(answer) - 1
            out = engine.model(input_ids=torch.tensor([[token]], device=engine.device),
                               position_ids=torch.tensor([[position]], device=engine.device),
                               **cache_kwargs(pre.cache), use_cache=True)
            rows.append(out.logits[0, -1].float())
    return answer, torch.stack(rows)


def compare_to_full(engine, prompts: Sequence, n_tokens: int = 32, strategy: Optional[str] = None,
                    recompute_ratio: Optional[float] = None) -> dict:
    """Per-prompt and mean top-1 agreement and KL of the engine's configuration vs full prefill."""
    rows = []
    for prompt in prompts:
        answer, ref = greedy_reference(engine, prompt, n_tokens)
        pre = engine.prefill(prompt, strategy=strategy, recompute_ratio=recompute_ratio, max_new_tokens=n_tokens)
        kl, top1 = kl_top1(ref, engine.teacher_forced_logits(pre, answer))
        rows.append({
            "top1_agreement": top1,
            "kl_mean": kl,
            "answer_tokens": len(answer),
            "reused_tokens": pre.stats.reused_tokens,
            "recomputed_tokens": pre.stats.recomputed_tokens,
            "fresh_tokens": pre.stats.fresh_tokens,
        })
    n = max(len(rows), 1)
    return {
        "top1_agreement": sum(r["top1_agreement"] for r in rows) / n,
        "kl_mean": sum(r["kl_mean"] for r in rows) / n,
        "prompts": rows,
    }
