"""Answer metrics and aggregates of the benchmark.

* :func:`normalize_answer`, :func:`token_f1`: the SQuAD definitions, so figures compare with the
  literature; :func:`contains_answer` for verbose 32-token answers, where F1 is dominated by length.
* :func:`mean_ci95`: mean over queries with a Student-t 95% interval (few queries: the normal
  quantile would make the interval too narrow).
* :func:`median`, :func:`mean`: skip ``None`` (a metric a method or query does not have) and
  return ``None`` when nothing is left.
* :func:`wilson_ci95`: a 95% Wilson score interval of a proportion ``k/n`` (stays inside [0, 1]
  and is not degenerate at 0 or n, unlike the Student-t interval of a share near 1).
* :func:`retention`, :func:`verdict_agreement`, :func:`share`: judging a method against a reference
  (the full prefill) on per-question right/wrong verdicts: the share of the reference's correct
  answers the method keeps, and the share of questions on which both give the same verdict.

Teacher-forced fidelity (KL, top-1) lives in the core, :func:`kvboost_rag.fidelity.kl_top1`, as
the engine's ``verify`` uses it too. Pure Python: no torch here.
"""
from __future__ import annotations

import math
import re
import statistics
import string
from collections import Counter
from typing import Optional, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between a prediction and a gold answer (both normalized)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, gold: str) -> float:
    """1.0 when the normalized gold answer appears as a whole-word span of the normalized
    prediction (useful with verbose 32-token answers, where F1 is dominated by length)."""
    ref = normalize_answer(gold)
    return float(bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} ")


# two-sided 97.5% quantiles of Student's t for df = 1..30
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci95(values: Sequence[float], lower: Optional[float] = None) -> tuple[Optional[float], Optional[list]]:
    """Mean and a 95% Student-t confidence interval ``[lo, hi]`` (``None`` when n < 2);
    ``lower`` clips the interval to a known bound (KL >= 0)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    avg = statistics.fmean(vals)
    if len(vals) < 2:
        return avg, None
    df = len(vals) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    half = t * statistics.stdev(vals) / math.sqrt(len(vals))
    lo = avg - half if lower is None else max(lower, avg - half)
    return avg, [lo, avg + half]


_Z975 = 1.959963984540054


def wilson_ci95(k: int, n: int) -> Optional[list]:
    """95% Wilson score interval ``[lo, hi]`` of the proportion ``k / n``; ``None`` when ``n == 0``."""
    k, n = int(k), int(n)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson_ci95: need 0 <= k <= n, got k={k}, n={n}")
    z2 = _Z975 * _Z975
    p = k / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return [0.0 if k == 0 else lo, 1.0 if k == n else hi]   # exact at the ends (no float residue)


def share(flags: Sequence) -> dict:
    """``{"k", "n", "share", "ci95", "count"}`` of boolean-ish flags (``None`` entries skipped):
    ``share`` = k/n (None when n == 0), ``ci95`` the Wilson interval, ``count`` = ``"k/n"``."""
    vals = [bool(f) for f in flags if f is not None]
    k, n = sum(vals), len(vals)
    return {"k": k, "n": n, "share": (k / n if n else None), "ci95": wilson_ci95(k, n), "count": f"{k}/{n}"}


def retention(reference: Sequence, method: Sequence) -> dict:
    """Of the questions the reference answers correctly, the share the method also answers
    correctly: ``{"k", "n", "share", "ci95", "count"}`` (:func:`share` over those questions).

    ``reference`` and ``method`` are per-question verdicts in the same order (truthy = correct;
    a question where either is ``None`` is left out). No reference-correct question: ``share``
    and ``ci95`` are ``None`` and ``count`` is ``"0/0"``."""
    if len(reference) != len(method):
        raise ValueError(f"retention: {len(reference)} reference verdicts but {len(method)} method verdicts")
    return share([bool(m) for r, m in zip(reference, method) if r is not None and m is not None and r])


def verdict_agreement(reference: Sequence, method: Sequence) -> dict:
    """The share of questions on which the method's right/wrong verdict equals the reference's
    (both right or both wrong), as :func:`share`'s dict."""
    if len(reference) != len(method):
        raise ValueError(f"verdict_agreement: {len(reference)} reference verdicts but {len(method)} method verdicts")
    return share([bool(r) == bool(m) for r, m in zip(reference, method) if r is not None and m is not None])


def median(values) -> Optional[float]:
    """Median of the values that are not ``None``; ``None`` if there are none."""
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def mean(values) -> Optional[float]:
    """Mean of the values that are not ``None``; ``None`` if there are none."""
    vals = [v for v in values if v is not None]
    return float(statistics.fmean(vals)) if vals else None
