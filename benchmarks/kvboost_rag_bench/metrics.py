"""Answer metrics and aggregates of the benchmark.

* :func:`normalize_answer`, :func:`token_f1`: the SQuAD definitions, so figures compare with the
  literature; :func:`contains_answer` for verbose 32-token answers, where F1 is dominated by length.
* :func:`mean_ci95`: mean over queries with a Student-t 95% interval (few queries: the normal
  quantile would make the interval too narrow).
* :func:`median`, :func:`mean`: skip ``None`` (a metric a method or query does not have) and
  return ``None`` when nothing is left.

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


def median(values) -> Optional[float]:
    """Median of the values that are not ``None``; ``None`` if there are none."""
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def mean(values) -> Optional[float]:
    """Mean of the values that are not ``None``; ``None`` if there are none."""
    vals = [v for v in values if v is not None]
    return float(statistics.fmean(vals)) if vals else None
