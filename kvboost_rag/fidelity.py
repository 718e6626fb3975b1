"""How close is a reused/blended KV to a full prefill? Teacher-forced top-1 agreement and KL.

The reference answer is the full prefill's greedy continuation. Both caches are then fed the
same answer tokens (teacher forcing), so every position compares the next-token distributions
the two caches induce given an identical history; one early divergence cannot cascade.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def kl_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) per row, in nats."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    test = torch.log_softmax(test_logits.float(), dim=-1)
    return (ref.exp() * (ref - test)).sum(dim=-1)


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    return float((ref_logits.argmax(-1) == test_logits.argmax(-1)).float().mean())


@torch.inference_mode()
def greedy_reference(engine, prompt, n_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Full prefill, then greedy decode of up to ``n_tokens`` (stops after EOS)."""
    pre = engine.prefill(prompt, strategy="full", max_new_tokens=n_tokens)
    answer: list[int] = []
    logits = pre.logits
    while len(answer) < n_tokens:
        token = int(logits.argmax())
        answer.append(token)
        if token in engine.eos_ids or len(answer) == n_tokens:
            break
        n = len(pre.input_ids) + len(answer) - 1
        out = engine.model(input_ids=torch.tensor([[token]], device=engine.device),
                           position_ids=torch.tensor([[n]], device=engine.device),
                           past_key_values=pre.cache, use_cache=True)
        logits = out.logits[0, -1].float()
    ref_pre = engine.prefill(prompt, strategy="full", max_new_tokens=n_tokens)
    return answer, engine.teacher_forced_logits(ref_pre, answer)


def compare_to_full(engine, prompts: Sequence, n_tokens: int = 32, strategy: Optional[str] = None,
                    recompute_ratio: Optional[float] = None) -> dict:
    """Per-prompt and mean top-1 agreement and KL of the engine's configuration vs full prefill."""
    rows = []
    for prompt in prompts:
        answer, ref = greedy_reference(engine, prompt, n_tokens)
        pre = engine.prefill(prompt, strategy=strategy, recompute_ratio=recompute_ratio, max_new_tokens=n_tokens)
        test = engine.teacher_forced_logits(pre, answer)
        rows.append({
            "top1_agreement": top1_agreement(ref, test),
            "kl_mean": float(kl_divergence(ref, test).mean()),
            "answer_tokens": len(answer),
            "reused_tokens": pre.stats["reused_tokens"],
            "recomputed_tokens": pre.stats["recomputed_tokens"],
            "fresh_tokens": pre.stats["fresh_tokens"],
        })
    n = max(len(rows), 1)
    return {
        "top1_agreement": sum(r["top1_agreement"] for r in rows) / n,
        "kl_mean": sum(r["kl_mean"] for r in rows) / n,
        "prompts": rows,
    }
