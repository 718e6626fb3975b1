"""What a benchmark result looks like to a reader: a text table and PNG plots.

* :func:`format_table`: one row per method (median TTFT, speedup over full prefill, top-1, KL with
  its 95% interval, exact match, F1, contains-gold, reused / recomputed fractions); columns that
  no method has (e.g. fidelity in a speed-only run) are left out.
* :func:`format_judgement`: answers judged against the full prefill (multihop and any run with
  gold answers): accuracy overall / one-hop / two-hop, retention (share of the full prefill's
  correct answers a method keeps) and verdict agreement, with 95% intervals and counts, and the
  noise floor (``cacheblend@1``) spelled out.
* :func:`format_guard`: the faithfulness guard's leakage and random-distractor sets.
* :func:`format_warm`: the warm time and cost of each stored encoding (``warm: isolated X s,
  context Y s (Z.Zx)``).
* :func:`write_plots`: TTFT against context length (full prefill vs the plotted recompute ratio)
  and the ratio curve (speedup and top-1 agreement against the recompute ratio). matplotlib is
  imported when called, with the non-interactive Agg backend.

Both read only the JSON-able result dict of :mod:`kvboost_rag_bench.runner`, so they also work
on a result loaded back from ``--json``.
"""
from __future__ import annotations

from pathlib import Path


def format_table(result: dict) -> str:
    """The result as a text table, under a one-line header (model, queries, context, device)."""
    methods = result["methods"]
    cols = [("method", "{}"), ("TTFT med s", "{:.4f}"), ("speedup", "{:.2f}x"),
            ("top-1", "{:.3f}"), ("KL mean", "{:.4f}"), ("KL 95% CI", "{}"), ("exact", "{:.2f}"),
            ("F1", "{:.3f}"), ("has gold", "{:.2f}"), ("acc 1-hop", "{:.3f}"), ("acc 2-hop", "{:.3f}"),
            ("agree", "{:.3f}"), ("retention", "{:.3f}"), ("verdict", "{:.3f}"), ("reused", "{:.2f}"),
            ("recomp", "{:.2f}")]
    keys = [None, "ttft_median_s", "speedup_vs_full", "top1_agreement", "kl_mean", "kl_ci95",
            "greedy_exact_match", "answer_f1", "answer_contains_gold", "accuracy_one_hop",
            "accuracy_two_hop", "agreement_with_full", "retention", "verdict_agree", "reused_fraction",
            "recomputed_fraction"]
    rows = []
    for name, m in methods.items():
        row = []
        for (title, fmt), key in zip(cols, keys):
            val = _label(name, m) if key is None else m.get(key)
            if key == "retention" and m.get("retention_count"):   # "0.927 (51/55)"; "- (0/0)": nothing to keep
                row.append(f"{'-' if val is None else f'{val:.3f}'} ({m['retention_count']})")
            elif val is None:
                row.append("-")
            elif key == "kl_ci95":
                row.append(f"[{val[0]:.4f}, {val[1]:.4f}]")
            else:
                row.append(fmt.format(val))
        rows.append(row)
    present = [i for i in range(len(cols)) if any(r[i] != "-" for r in rows)]
    widths = {i: max(len(cols[i][0]), *(len(r[i]) for r in rows)) for i in present}
    lines = ["  ".join(cols[i][0].ljust(widths[i]) for i in present)]
    lines.append("  ".join("-" * widths[i] for i in present))
    lines += ["  ".join(r[i].ljust(widths[i]) for i in present) for r in rows]
    head = (f"model {result.get('model')} | {result.get('n_queries')} queries | "
            f"{result.get('docs_per_query')} docs/query | context median "
            f"{result.get('context_tokens_median')} tokens | "
            f"{result['machine'].get('device', '?')} {result['machine'].get('dtype', '')}")
    return head + "\n" + "\n".join(lines)


def _label(name: str, m: dict) -> str:
    return f"{name} [noise floor]" if m.get("noise_floor") else name


def _grid(headers: list, rows: list) -> list:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]


def _share(val, ci=None, count=None) -> str:
    """``0.927 [0.83, 0.97] 51/55`` (the parts that are there), ``-`` without a value."""
    if val is None:
        return "-" if not count else f"- {count}"
    out = f"{val:.3f}"
    if ci:
        out += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if count:
        out += f" {count}"
    return out


def _judgement_rows(methods: dict, hops: bool) -> tuple[list, list]:
    headers = ["method", "accuracy [95% CI]"]
    if hops:
        headers += ["acc 1-hop", "acc 2-hop"]
    headers += ["retention [95% CI] kept/full-correct"]
    if hops:
        headers += ["ret 1-hop", "ret 2-hop"]
    headers += ["verdict agree"]
    rows = []
    for name, m in methods.items():
        row = [_label(name, m), _share(m.get("answer_accuracy"), m.get("answer_accuracy_ci95"))]
        if hops:
            row += [_share(m.get("accuracy_one_hop"), m.get("accuracy_one_hop_ci95")),
                    _share(m.get("accuracy_two_hop"), m.get("accuracy_two_hop_ci95"))]
        row += [_share(m.get("retention"), m.get("retention_ci95"), m.get("retention_count"))]
        if hops:
            row += [_share(m.get("retention_one_hop"), m.get("retention_one_hop_ci95"), m.get("retention_one_hop_count")),
                    _share(m.get("retention_two_hop"), m.get("retention_two_hop_ci95"), m.get("retention_two_hop_count"))]
        row += [_share(m.get("verdict_agree"), m.get("verdict_agree_ci95"), m.get("verdict_agree_count"))]
        rows.append(row)
    return headers, rows


def _noise_floor_line(result: dict, methods: dict) -> str:
    name = result.get("noise_floor")
    m = methods.get(name) if name else None
    if not m:
        return ""
    return (f"noise floor: {name} (recompute ratio 1, same dtype) keeps "
            f"{_share(m.get('retention'), m.get('retention_ci95'), m.get('retention_count'))} of the full "
            f"prefill's correct answers, verdict agreement {_share(m.get('verdict_agree'), m.get('verdict_agree_ci95'))}; "
            "a shortfall from 1.0 no larger than the floor's is numerical noise, not reuse error")


def format_judgement(result: dict) -> str:
    """Answers judged against the full prefill: one row per method with accuracy (overall and by
    hops), retention and verdict agreement (95% intervals, counts), then the noise-floor line.
    Empty when no method has a retention (no gold answers)."""
    methods = result.get("methods") or {}
    if not any("retention" in m for m in methods.values()):
        return ""
    hops = any("retention_one_hop" in m for m in methods.values())
    headers, rows = _judgement_rows(methods, hops)
    lines = ["answers judged against the full prefill (retention: of the questions the full prefill answers "
             "correctly, the share the method also does):"] + _grid(headers, rows)
    floor = _noise_floor_line(result, methods)
    return "\n".join(lines + ([floor] if floor else []))


def format_guard(result: dict) -> str:
    """The faithfulness guard's sets (``--leakage``, ``--distractors``); empty when neither ran."""
    parts = []
    leak = result.get("leakage")
    if leak:
        where = leak.get("answer_doc_in_context")
        head = (f"leakage: {leak['n_questions']} one-hop questions without their answer document "
                "(a correct answer is a leak)"
                + (f"; answer document in the index-time context of a retrieved document: {where} questions"
                   if where else ""))
        headers = ["method", "leak rate [95% CI]", "leaks"]
        split = any("leaks_answer_in_context" in m for m in leak["methods"].values())
        if split:
            headers += ["answer doc in context", "not in context"]
        rows = []
        for name, m in leak["methods"].items():
            row = [_label(name, m), _share(m.get("leak_rate"), m.get("leak_ci95")), m.get("leaks") or "-"]
            if split:
                row += [m.get("leaks_answer_in_context") or "-", m.get("leaks_answer_not_in_context") or "-"]
            rows.append(row)
        parts.append("\n".join([head] + _grid(headers, rows)))
    rand = result.get("random_distractors")
    if rand:
        methods = rand["methods"]
        hops = any("retention_one_hop" in m for m in methods.values())
        headers, rows = _judgement_rows(methods, hops)
        parts.append("\n".join([f"random distractors: {rand['n_questions']} questions, the needed documents plus "
                                 "documents unrelated to the question"] + _grid(headers, rows)))
    return "\n".join(parts)


def format_warm(result: dict) -> str:
    """``warm: isolated X s, context Y s (Z.Zx)`` and what the context cost; empty without a
    per-encoding warm summary."""
    warm = result.get("warm") or {}
    encs = [e for e in result.get("encodings") or () if isinstance(warm.get(e), dict)]
    if not encs:
        return ""
    parts = [f"{e} {warm[e]['seconds']:.2f} s" for e in encs]
    line = "warm: " + ", ".join(parts)
    ratio = warm.get("context_vs_isolated")
    if ratio is not None:
        line += f" ({ratio:.1f}x)"
    docs = {warm[e]["encoded"] for e in encs}
    line += f"; {'/'.join(str(d) for d in sorted(docs))} documents encoded"
    ctx = warm.get("context")
    if isinstance(ctx, dict):
        line += (f"; context: {ctx['context_encoded']} documents after their neighbours, "
                 f"+{ctx['context_tokens']} context tokens over {ctx['tokens']} document tokens")
    if result.get("encodings_requested") and result.get("encodings") != result.get("encodings_requested"):
        line += (f" (requested {','.join(result['encodings_requested'])}: this core has no index-time "
                 "context encoding)")
    return line


# ---------------------------------------------------------------------------------- plots
def write_plots(result: dict, plot_dir: Path, stem: str = "bench") -> list[str]:
    """PNG plots: TTFT vs context length (full vs cacheblend) and the ratio curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    scaling = result.get("scaling") or []
    if scaling:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [s["context_tokens_median"] for s in scaling]
        names = [k for k in scaling[0]["ttft_median_s"]]
        for name in names:
            ax.plot(xs, [s["ttft_median_s"][name] for s in scaling], marker="o", label=name)
        for s in scaling:
            ax.annotate(f"{s['n_docs']} docs", (s["context_tokens_median"],
                                                  s["ttft_median_s"]["full"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("time to first token (s, median)")
        ax.set_title(f"TTFT vs context: {result.get('model')}", fontsize=9)
        paths.append(_save(fig, [ax], plot_dir / f"{stem}_ttft_vs_context.png", legend=8))

    curve = [(m["recompute_ratio"], name, m) for name, m in result["methods"].items()
             if (name == "reuse" or name.startswith("cacheblend@")) and "/" not in name]  # first encoding
    curve = sorted(((0.0 if n == "reuse" else float(r)), n, m) for r, n, m in curve)
    if curve:
        has_top1 = any(m.get("top1_agreement") is not None for _, _, m in curve)
        fig, axes = plt.subplots(1, 2 if has_top1 else 1, figsize=(9 if has_top1 else 5, 3.6))
        axes = list(axes) if has_top1 else [axes]
        rs = [r for r, _, _ in curve]
        axes[0].plot(rs, [m["speedup_vs_full"] for _, _, m in curve], marker="o")
        axes[0].axhline(1.0, color="gray", lw=0.8, ls="--")
        axes[0].set_xlabel("recompute ratio")
        axes[0].set_ylabel("TTFT speedup vs full prefill")
        axes[0].grid(alpha=0.3)
        if has_top1:
            axes[1].plot(rs, [m.get("top1_agreement") for _, _, m in curve], marker="o", color="C1")
            axes[1].set_xlabel("recompute ratio")
            axes[1].set_ylabel("teacher-forced top-1 agreement")
            axes[1].grid(alpha=0.3)
        fig.suptitle(f"ratio curve: {result.get('model')}, {result.get('docs_per_query')} docs", fontsize=9)
        fig.tight_layout()
        p = plot_dir / f"{stem}_ratio_curve.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(str(p))

    frontier = frontier_points(result)
    if frontier:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for rule, points in frontier.items():
            points.sort()
            ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o", label=rule)
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        full = result["methods"]["full"].get("answer_accuracy")
        ax.axhline(full, color="black", lw=0.8, ls="--", label="full prefill")
        ax.axhline(0.98 * full, color="gray", lw=0.8, ls=":", label="98% of full")
        ax.set_xlabel("TTFT speedup vs full prefill (median of per-prompt ratios)")
        ax.set_ylabel("answer accuracy (gold in answer)")
        ax.set_title(f"accuracy-speed frontier: {result.get('model')}, {result.get('source')}", fontsize=8)
        paths.append(_save(fig, [ax], plot_dir / f"{stem}_frontier.png", legend=7))
    return paths


def _save(fig, axes, path: Path, legend: int = 0) -> str:
    """Grid on every axis (and a legend of font size ``legend``), tight layout, PNG at 120 dpi."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def frontier_points(result: dict) -> dict:
    """``{rule: [(speedup, accuracy, label), ...]}`` of every method with an answer accuracy
    (``cacheblend@R`` is the engine's default rule; ``default`` and ``reuse`` are their own)."""
    out: dict = {}
    for name, m in result["methods"].items():
        if name == "full" or m.get("answer_accuracy") is None or m.get("speedup_vs_full") is None:
            continue
        name, _, encoding = name.partition("/")   # other encodings: their own curves
        rule, _, ratio = name.partition("@")
        rule = {"cacheblend": "attention (engine default rule)"}.get(rule, rule)
        rule = f"{rule}, {encoding}" if encoding else rule
        out.setdefault(rule, []).append((m["speedup_vs_full"], m["answer_accuracy"], ratio or name))
    return out

