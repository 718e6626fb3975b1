"""Where a prefill's time goes: ``kvboost-rag bench --profile``.

Runs each method's prefill over the benchmark's prompts under :mod:`torch.profiler` and splits
the time by the core's named phases (:mod:`kvboost_rag.phases`: fetch, assemble = re-rotation
and assembly, probe = the question probe, selected_layers, logits) and, inside each phase, by
kind of work: ``matmul`` (linear layers and other matrix products outside attention),
``attention`` (the fused attention kernel and, in a blend, everything inside the masked
attention over scattered tokens) and ``other`` (norms, RoPE, copies, indexing, Python).
The full prefill (one model forward) has no phases: its row is split by kind only.

Profiling slows small operations, so the shares are what to read; the wall-clock TTFT beside
them is measured in the same run without the profiler.
"""
from __future__ import annotations

from collections import defaultdict
from statistics import median
from typing import Sequence

from kvboost_rag.phases import PREFIX

MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::scaled_dot_product")
KINDS = ("matmul", "attention", "other")


def _classify(event) -> tuple[str, str]:
    """(phase, kind) of one profiler event, from its name and its enclosing ``kvboost.*`` ranges."""
    ranges = []
    parent = event
    while parent is not None:
        if parent.name.startswith(PREFIX):
            ranges.append(parent.name[len(PREFIX):])
        parent = parent.cpu_parent
    in_attention = "attention" in ranges or event.name.startswith(ATTENTION_OPS)
    outer = [r for r in ranges if r != "attention"]
    phase = outer[-1] if outer else ("attention" if ranges else "unphased")
    if event.name.startswith(PREFIX):
        kind = "other"   # the range's own self time: Python between its operators
    elif in_attention:
        kind = "attention"
    elif event.name in MATMUL_OPS:
        kind = "matmul"
    else:
        kind = "other"
    return phase, kind


def profile_methods(engine, prompts: Sequence, methods: Sequence, *, rounds: int = 1) -> dict:
    """Per method: median wall TTFT over ``prompts`` (no profiler), and the profiled time per
    prompt by phase and kind (milliseconds)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for method in methods:
        kwargs = method.kwargs()
        with torch.inference_mode():
            engine.prefill(prompts[0], **kwargs)                       # warm-up
            wall = [engine.prefill(p, **kwargs).ttft_s for p in prompts for _ in range(rounds)]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for p in prompts:
                    engine.prefill(p, **kwargs)
        table: dict = defaultdict(lambda: dict.fromkeys(KINDS, 0.0))
        for event in prof.events():
            if event.device_type.name != "CPU":
                continue
            phase, kind = _classify(event)
            table[phase][kind] += event.self_cpu_time_total / 1e3 / len(prompts)
        rows = {ph: {**kinds, "total": sum(kinds.values())} for ph, kinds in table.items()}
        out[method.name] = {"ttft_median_s": median(wall),
                            "profiled_ms": sum(r["total"] for r in rows.values()),
                            "phases_ms": dict(sorted(rows.items(), key=lambda kv: -kv[1]["total"]))}
    return out


def format_profile(profile: dict) -> str:
    """The profile as a text table: one block per method, one row per phase."""
    lines = []
    for name, res in profile.items():
        total = res["profiled_ms"] or 1.0
        lines.append(f"{name}: TTFT median {res['ttft_median_s'] * 1e3:.1f} ms (no profiler); "
                     f"profiled {res['profiled_ms']:.1f} ms per prompt")
        lines.append(f"  {'phase':16s} {'ms':>8s} {'share':>6s} {'matmul':>8s} {'attention':>9s} {'other':>8s}")
        for phase, row in res["phases_ms"].items():
            lines.append(f"  {phase:16s} {row['total']:8.1f} {row['total'] / total:6.1%} {row['matmul']:8.1f} "
                         f"{row['attention']:9.1f} {row['other']:8.1f}")
    return "\n".join(lines)
