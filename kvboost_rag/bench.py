"""``kvboost-rag bench``: TTFT and fidelity of KV reuse against a full prefill.

For every query the prompt is built from its retrieved documents in retrieval order (explicit
segments via :meth:`KVBoostEngine.chat_segments`: a system instruction, the documents as
``Segment.document``, then the question). In one process, interleaved on the same prompts, it runs

* ``full``      -- plain prefill (the baseline),
* ``default``   -- the engine's default configuration (no strategy override),
* ``reuse``     -- ratio 0: re-rotation only,
* ``cacheblend@R`` -- selective recompute of a fraction R of the reused tokens (``cacheblend@1``: all).

Per method it reports the median TTFT measured by the engine, the speedup over full prefill
(median of per-prompt ratios), teacher-forced top-1 agreement and KL over the full prefill's greedy
32-token answer (with a 95% confidence interval of KL over queries), greedy exact match, token F1
against the gold answer where one is given, and the fraction of prompt tokens reused/recomputed.
It plots TTFT against context length (number of documents) and the ratio curve.

``--random-weights CONFIG`` benchmarks speed only, with a randomly initialized model of a given
shape (for machines where no weights can be downloaded) and a random-token corpus.

Run ``kvboost-rag bench --help`` or ``python -m kvboost_rag.bench --help``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import string
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .fidelity import kl_top1

SYSTEM_PROMPT = ("You are a helpful assistant. Answer the question using only the documents "
                 "provided. Answer in a few words.")
DEFAULT_RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
DEFAULT_PLOT_DOCS = (2, 4, 8, 16)

# --------------------------------------------------------------------------------- metrics
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
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return mean, None
    df = len(vals) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    half = t * statistics.stdev(vals) / math.sqrt(len(vals))
    lo = mean - half if lower is None else max(lower, mean - half)
    return mean, [lo, mean + half]


def _median(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(statistics.fmean(vals)) if vals else None


# --------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    strategy: Optional[str]         # None -> engine default
    ratio: Optional[float]

    def kwargs(self) -> dict:
        out: dict = {}
        if self.strategy is not None:
            out["strategy"] = self.strategy
        if self.ratio is not None:
            out["recompute_ratio"] = self.ratio
        return out


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ratios: expected comma-separated numbers in [0, 1], got {text!r}") from None
    for r in ratios:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"--ratios: {r} is outside [0, 1]")
    return list(dict.fromkeys(ratios))


def parse_int_list(text: str, flag: str) -> list[int]:
    if text is None or str(text).strip() in ("", "0", "none"):
        return []
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"{flag}: values must be >= 1")
    return sorted(dict.fromkeys(vals))


def method_name(ratio: float) -> str:
    return "reuse" if ratio == 0 else f"cacheblend@{ratio:g}"


def build_methods(ratios: Sequence[float]) -> list[Method]:
    """``full`` and ``default`` always, then one method per ratio (0 -> ``reuse``)."""
    methods = [Method("full", "full", None), Method("default", None, None)]
    for r in ratios:
        if r == 0:
            methods.append(Method("reuse", "reuse", None))
        else:
            methods.append(Method(method_name(r), "cacheblend", float(r)))
    return methods


# --------------------------------------------------------------------------------- prompts
def build_prompt(engine, doc_texts: Sequence[str], question: str, system: str = SYSTEM_PROMPT):
    """Explicit segments: system instruction, documents in the given order, then the question
    (``chat_segments`` joins the parts of a message with a blank line)."""
    from . import Segment

    content: list = ["Documents:"]
    content += [Segment.document(text) for text in doc_texts]
    content.append(f"Question: {question}")
    return engine.chat_segments([{"role": "system", "content": system},
                                 {"role": "user", "content": content}])


# --------------------------------------------------------------------------------- machine
def machine_info(engine=None) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if engine is not None:
        try:
            p = next(engine.model.parameters())
            info["device"], info["dtype"] = str(p.device), str(p.dtype).replace("torch.", "")
            if p.device.type == "cuda":
                info["gpu"] = torch.cuda.get_device_name(p.device)
        except Exception:  # pragma: no cover
            pass
    return info


# ------------------------------------------------------------------------ random weights
# Shapes of public configs (weights are random: speed only).
RANDOM_CONFIGS: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=4096),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=130000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, use_sliding_window=False),
}

_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                  "message['content'] + '<|im_end|>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_WORD_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]


def make_word_tokenizer(vocab_size: int = 1024):
    """An in-memory whitespace word-level tokenizer (``w0 .. wN`` plus chat specials and a few
    prompt words) with a ChatML template; ``vocab_size`` ids in total. Offline, deterministic."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Documents:", "Question:", "system", "user", "assistant"]
    fixed = _WORD_SPECIALS + words
    if vocab_size < len(fixed) + 16:
        raise ValueError(f"vocab_size {vocab_size} too small for the word tokenizer")
    vocab = {tok: i for i, tok in enumerate(fixed)}
    for i in range(vocab_size - len(fixed)):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def word_count(tokenizer) -> int:
    """How many ``wN`` words :func:`make_word_tokenizer` produced."""
    return sum(1 for t in tokenizer.get_vocab() if re.fullmatch(r"w\d+", t))


def random_text(rng: random.Random, n_tokens: int, n_words: int) -> str:
    """``n_tokens`` random words: exactly ``n_tokens`` ids with :func:`make_word_tokenizer`."""
    return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n_tokens))


def load_random_config(spec: str):
    """A transformers config from a built-in name (:data:`RANDOM_CONFIGS`) or a JSON file."""
    from transformers import AutoConfig

    if spec in RANDOM_CONFIGS:
        raw = dict(RANDOM_CONFIGS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--random-weights: {spec!r} is neither a built-in config "
                             f"({', '.join(RANDOM_CONFIGS)}) nor a JSON file")
        raw = json.loads(path.read_text())
    raw = dict(raw)
    model_type = raw.pop("model_type", "llama")
    for k in ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
              "quantization_config", "auto_map"):
        raw.pop(k, None)
    return AutoConfig.for_model(model_type, **raw)


def build_random_model(config, *, device: str = "cpu", dtype=None, seed: int = 0):
    """A randomly initialized causal LM of ``config`` built directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def resolve_device(device: str) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ------------------------------------------------------------------------------- runner
def _log(quiet: bool, *msg) -> None:
    if not quiet:
        print(*msg, file=sys.stderr, flush=True)


class Bench:
    """Runs the interleaved measurements on an engine. All timings are the engine's own."""

    def __init__(self, engine, *, answer_tokens: int = 32, repeats: int = 1, fidelity: bool = True,
                 quiet: bool = False) -> None:
        self.engine = engine
        self.answer_tokens = answer_tokens
        self.repeats = max(1, int(repeats))
        self.fidelity = fidelity
        self.quiet = quiet

    def _generate(self, segments, method: Method):
        results = [self.engine.generate(segments, max_new_tokens=self.answer_tokens, temperature=0.0,
                                        **method.kwargs()) for _ in range(self.repeats)]
        return results[0], [float(r.ttft_s) for r in results]

    def run_query(self, segments, methods: Sequence[Method], gold: Optional[str] = None) -> dict:
        """All methods on one prompt: ``full`` first (its greedy answer is the teacher-forcing
        target), then the others in order."""
        assert methods[0].name == "full"
        out: dict = {}
        ref_logits = None
        answer_ids: list = []
        full_text = None
        for method in methods:
            res, samples = self._generate(segments, method)
            row: dict = {
                "ttft_s": min(samples),
                "text": res.text,
                "token_ids": list(res.token_ids),
                "prompt_tokens": int(res.prompt_tokens),
                "reused_tokens": int(res.reused_tokens),
                "recomputed_tokens": int(res.recomputed_tokens),
                "fresh_tokens": int(res.fresh_tokens),
                "strategy": res.strategy,
                "recompute_ratio": res.recompute_ratio,
            }
            if method.name == "full":
                answer_ids = list(res.token_ids)
                full_text = res.text
            row["exact_match"] = float(list(res.token_ids) == answer_ids)
            row["f1"] = token_f1(res.text, gold) if gold is not None else None
            row["contains_answer"] = contains_answer(res.text, gold) if gold is not None else None
            if self.fidelity:
                pre = self.engine.prefill(segments, **method.kwargs())
                row["prefill_ttft_s"] = float(pre.ttft_s)
                # the fidelity prefill is one more engine-timed TTFT sample of the same computation;
                # the lowest sample filters out interference from other processes
                samples.append(float(pre.ttft_s))
                row["ttft_s"] = min(samples)
                logits = self._tf_logits(pre, answer_ids)
                del pre
                if method.name == "full":
                    ref_logits = logits
                    row["kl"], row["top1"] = 0.0, 1.0
                else:
                    row["kl"], row["top1"] = kl_top1(ref_logits, logits)
                del logits
            row["ttft_samples_s"] = samples
            out[method.name] = row
        out["_full_text"] = full_text
        return out

    def _tf_logits(self, pre, answer_ids):
        import torch

        if answer_ids:
            return self.engine.teacher_forced_logits(pre, answer_ids).detach().float()
        return torch.as_tensor(pre.logits).detach().float().reshape(1, -1)

    def ttft_only(self, segments, methods: Sequence[Method]) -> dict:
        out = {}
        for method in methods:
            res, ttft = self._generate_first(segments, method)
            out[method.name] = {"ttft_s": ttft, "prompt_tokens": int(res.prompt_tokens),
                                "reused_tokens": int(res.reused_tokens),
                                "recomputed_tokens": int(res.recomputed_tokens),
                                "fresh_tokens": int(res.fresh_tokens)}
        return out

    def _generate_first(self, segments, method: Method):
        results = [self.engine.generate(segments, max_new_tokens=1, temperature=0.0, **method.kwargs())
                   for _ in range(self.repeats)]
        return results[0], min(float(r.ttft_s) for r in results)


def summarize(per_query: list[dict], methods: Sequence[Method], *, has_gold: bool) -> dict:
    """Per-method aggregates over queries (see module docstring)."""
    summary = {}
    for m in methods:
        rows = [q["methods"][m.name] for q in per_query]
        fulls = [q["methods"]["full"] for q in per_query]
        ratios = [f["ttft_s"] / r["ttft_s"] for f, r in zip(fulls, rows) if r["ttft_s"] > 0]
        prompt = [r["prompt_tokens"] for r in rows]

        def frac(key):
            return _mean([r[key] / p if p else None for r, p in zip(rows, prompt)])

        entry: dict = {
            "strategy": m.strategy if m.strategy is not None else (rows[0].get("strategy") if rows else None),
            "recompute_ratio": m.ratio if m.ratio is not None else (rows[0].get("recompute_ratio") if rows else None),
            "ttft_median_s": _median(r["ttft_s"] for r in rows),
            "ttft_mean_s": _mean(r["ttft_s"] for r in rows),
            "speedup_vs_full": _median(ratios),
            "reused_fraction": frac("reused_tokens"),
            "recomputed_fraction": frac("recomputed_tokens"),
            "fresh_fraction": frac("fresh_tokens"),
        }
        if rows and "kl" in rows[0]:
            kl_mean, kl_ci = mean_ci95([r["kl"] for r in rows], lower=0.0)
            entry.update({
                "top1_agreement": _mean(r["top1"] for r in rows),
                "kl_mean": kl_mean,
                "kl_ci95": kl_ci,
                "greedy_exact_match": _mean(r["exact_match"] for r in rows),
                "answer_f1": _mean(r["f1"] for r in rows) if has_gold else None,
                "answer_contains_gold": _mean(r.get("contains_answer") for r in rows) if has_gold else None,
            })
        if rows and "prefill_ttft_s" in rows[0]:
            entry["prefill_ttft_median_s"] = _median(r["prefill_ttft_s"] for r in rows)
        summary[m.name] = entry
    return summary


# ---------------------------------------------------------------------------------- table
def format_table(result: dict) -> str:
    methods = result["methods"]
    cols = [("method", "{}"), ("TTFT med s", "{:.4f}"), ("speedup", "{:.2f}x"),
            ("top-1", "{:.3f}"), ("KL mean", "{:.4f}"), ("KL 95% CI", "{}"), ("exact", "{:.2f}"),
            ("F1", "{:.3f}"), ("has gold", "{:.2f}"), ("reused", "{:.2f}"), ("recomp", "{:.2f}")]
    keys = [None, "ttft_median_s", "speedup_vs_full", "top1_agreement", "kl_mean", "kl_ci95",
            "greedy_exact_match", "answer_f1", "answer_contains_gold", "reused_fraction",
            "recomputed_fraction"]
    rows = []
    for name, m in methods.items():
        row = []
        for (title, fmt), key in zip(cols, keys):
            val = name if key is None else m.get(key)
            if val is None:
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
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = plot_dir / f"{stem}_ttft_vs_context.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(str(p))

    curve = [(m["recompute_ratio"], name, m) for name, m in result["methods"].items()
             if name == "reuse" or name.startswith("cacheblend@")]
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
    return paths


# ---------------------------------------------------------------------------------- stores
def make_store(args) -> tuple[Any, Optional[str]]:
    """The store to benchmark with. Returns ``(store, directory)``.

    * neither ``--cold`` nor ``--kv-bits``: ``None`` (the engine's default memory store);
    * ``--cold``: a :class:`kvboost_rag.disk_store.DiskStore` alone, so every query reads its
      chunks from disk (OS page cache aside);
    * ``--kv-bits`` without ``--cold``: a memory tier over a quantized DiskStore
      (``TieredStore``), so queries use exactly the quantized-then-dequantized KV from memory.
    """
    if not args.cold and args.kv_bits is None:
        return None, None
    try:
        from .disk_store import DiskStore
    except ImportError as exc:
        raise SystemExit(f"bench: --cold/--kv-bits need kvboost_rag.disk_store.DiskStore, which "
                         f"could not be imported ({exc})")
    path = args.store_dir or tempfile.mkdtemp(prefix="kvboost-bench-")
    kwargs = {} if args.kv_bits is None else {"kv_bits": args.kv_bits}
    try:
        disk = DiskStore(path, **kwargs)
    except TypeError as exc:
        raise SystemExit(f"bench: this DiskStore does not accept {kwargs} ({exc})")
    if args.cold:
        return disk, str(path)
    from .disk_store import TieredStore
    from .store import MemoryStore
    return TieredStore(MemoryStore(None), disk), str(path)


# ---------------------------------------------------------------------------------- driver
def _load_engine(args, store):
    from . import KVBoostEngine

    kw: dict = {"device": args.device}
    if args.dtype:
        kw["dtype"] = args.dtype
    if store is not None:
        kw["store"] = store
    return KVBoostEngine.from_pretrained(args.model, **kw)


def _dataset(args, engine) -> tuple[list, list, str]:
    from . import corpora

    if bool(args.corpus) != bool(args.queries):
        raise SystemExit("bench: give both --corpus and --queries, or neither (built-in corpus)")
    if args.corpus:
        docs, queries = corpora.load_corpus(args.corpus), corpora.load_queries(args.queries)
        source = f"{args.corpus} + {args.queries}"
    else:
        docs, queries = corpora.builtin_dataset(lambda t: len(engine.tokenize_document(t)))
        source = "builtin:pydoc_data.topics"
    if args.max_queries:
        queries = queries[: args.max_queries]
    return docs, queries, source


def run_bench(args, *, engine=None) -> dict:
    """The real-model benchmark (``engine``: an already-built engine, else loaded from
    ``--model``). Returns the JSON-able result."""
    import torch
    from . import corpora

    ratios = parse_ratios(args.ratios)
    plot_docs = [] if args.no_plot else parse_int_list(args.plot_docs, "--plot-docs")
    methods = build_methods(ratios)
    store, store_dir = make_store(args)
    t0 = time.perf_counter()
    if engine is None:
        engine = _load_engine(args, store)
    load_s = time.perf_counter() - t0
    _log(args.quiet, f"[bench] loaded {engine.model_name} in {load_s:.1f}s")

    docs, queries, source = _dataset(args, engine)
    by_id = {d.id: d for d in docs}
    need_k = max([args.k] + plot_docs)
    retrieval = "doc_ids" if all(q.doc_ids is not None for q in queries) else "all-MiniLM-L6-v2 + FAISS"
    t0 = time.perf_counter()
    corpora.attach_doc_ids(docs, queries, need_k)
    retrieve_s = time.perf_counter() - t0
    with_topic = [q for q in queries if q.topic]
    recall = (_mean(float(q.topic in q.doc_ids[: args.k]) for q in with_topic) if with_topic else None)

    with torch.inference_mode():
        used = list(dict.fromkeys(d for q in queries for d in q.doc_ids))
        t0 = time.perf_counter()
        warm = engine.warm([by_id[d].text for d in used])
        warm_s = time.perf_counter() - t0
        _log(args.quiet, f"[bench] warmed {len(used)} documents in {warm_s:.1f}s")

        bench = Bench(engine, answer_tokens=args.answer_tokens, repeats=args.repeats, quiet=args.quiet)
        prompts = [build_prompt(engine, [by_id[d].text for d in q.doc_ids[: args.k]], q.question)
                   for q in queries]
        for _ in range(args.warmup):          # discarded warm-up round(s)
            bench.run_query(prompts[0], methods, gold=None)
        per_query = []
        for i, (q, segs) in enumerate(zip(queries, prompts)):
            t0 = time.perf_counter()
            res = bench.run_query(segs, methods, gold=q.answer)
            full_text = res.pop("_full_text")
            per_query.append({"id": q.id, "question": q.question, "answer": q.answer,
                              "doc_ids": q.doc_ids[: args.k],
                              "context_tokens": res["full"]["prompt_tokens"],
                              "full_answer": full_text, "methods": res})
            _log(args.quiet, f"[bench] query {i + 1}/{len(queries)} ({res['full']['prompt_tokens']} tokens) "
                             f"in {time.perf_counter() - t0:.1f}s: full {res['full']['ttft_s']:.3f}s, "
                             + ", ".join(f"{k} {v['ttft_s']:.3f}s" for k, v in res.items() if k != "full"))

        scaling = []
        if plot_docs:
            plot_methods = [Method("full", "full", None),
                            Method(method_name(args.plot_ratio), "cacheblend" if args.plot_ratio else "reuse",
                                   args.plot_ratio if args.plot_ratio else None)]
            pq = queries[: max(1, args.plot_queries)]
            for n in plot_docs:
                rows = []
                for q in pq:
                    if len(q.doc_ids) < n:
                        continue
                    segs = build_prompt(engine, [by_id[d].text for d in q.doc_ids[:n]], q.question)
                    rows.append(bench.ttft_only(segs, plot_methods))
                if not rows:
                    _log(args.quiet, f"[bench] plot: no query has {n} documents, skipped")
                    continue
                scaling.append(_scaling_point(n, rows, plot_methods))
                _log(args.quiet, f"[bench] plot {n} docs: {scaling[-1]['ttft_median_s']}")

    has_gold = any(q.answer is not None for q in queries)
    result = {
        "model": engine.model_name,
        "fingerprint": getattr(engine, "fingerprint", None),
        "machine": machine_info(engine),
        "source": source,
        "retrieval": retrieval,
        "retrieval_recall_at_k": recall,
        "store": type(engine.store).__name__ + (f" ({store_dir})" if store_dir else ""),
        "cold": bool(args.cold),
        "kv_bits": args.kv_bits,
        "n_queries": len(per_query),
        "docs_per_query": args.k,
        "answer_tokens": args.answer_tokens,
        "warmup_rounds": args.warmup,
        "repeats": args.repeats,
        "context_tokens_median": _median(q["context_tokens"] for q in per_query),
        "timings_s": {"load": load_s, "retrieve": retrieve_s, "warm": warm_s},
        "warm_report": _jsonable(warm),
        "methods": summarize(per_query, methods, has_gold=has_gold),
        "scaling": scaling,
        "per_query": [_strip_ids(q) for q in per_query],
    }
    return result


def _scaling_point(n: int, rows: list[dict], methods: Sequence[Method]) -> dict:
    return {
        "n_docs": n,
        "n_queries": len(rows),
        "context_tokens_median": _median(r["full"]["prompt_tokens"] for r in rows),
        "ttft_median_s": {m.name: _median(r[m.name]["ttft_s"] for r in rows) for m in methods},
        "speedup_vs_full": {m.name: _median(r["full"]["ttft_s"] / r[m.name]["ttft_s"] for r in rows)
                            for m in methods if m.name != "full"},
    }


def _strip_ids(q: dict) -> dict:
    q = dict(q)
    q["methods"] = {k: {kk: vv for kk, vv in v.items() if kk != "token_ids"} for k, v in q["methods"].items()}
    return q


def _jsonable(obj):
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    for attr in ("to_dict", "_asdict"):
        if hasattr(obj, attr):
            try:
                return _jsonable(getattr(obj, attr)())
            except Exception:
                pass
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses
        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def run_random_bench(args, *, engine=None) -> dict:
    """Speed only, randomly initialized weights of a given config shape, random-token corpus."""
    import torch
    from . import KVBoostEngine

    ratios = parse_ratios(args.ratios)
    plot_docs = [] if args.no_plot else parse_int_list(args.plot_docs, "--plot-docs")
    methods = build_methods(ratios)
    store, store_dir = make_store(args)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if engine is None:
        config = load_random_config(args.random_weights)
        model = build_random_model(config, device=device, dtype=args.dtype, seed=args.seed)
        tok = make_word_tokenizer(min(int(config.vocab_size), 32000))
        kw = {} if store is None else {"store": store}
        engine = KVBoostEngine(model, tok, **kw)
    load_s = time.perf_counter() - t0
    name = f"random:{args.random_weights}"
    _log(args.quiet, f"[bench] built {name} on {device} in {load_s:.1f}s")

    rng = random.Random(args.seed)
    n_words = word_count(engine.tokenizer)
    n_docs_max = max([args.k] + plot_docs)
    n_queries = args.max_queries or 5
    pool = [random_text(rng, args.doc_tokens, n_words) for _ in range(n_docs_max * 2)]
    queries = [(random_text(rng, args.question_tokens, n_words), rng.sample(range(len(pool)), n_docs_max))
               for _ in range(n_queries)]
    bench = Bench(engine, answer_tokens=1, repeats=args.repeats, fidelity=False, quiet=args.quiet)

    with torch.inference_mode():
        t0 = time.perf_counter()
        warm = engine.warm(pool)
        warm_s = time.perf_counter() - t0
        prompts = [build_prompt(engine, [pool[i] for i in ids[: args.k]], qq) for qq, ids in queries]
        for _ in range(args.warmup):          # discarded warm-up round(s)
            bench.ttft_only(prompts[0], methods)
        per_query = []
        for qi, segs in enumerate(prompts):
            res = bench.ttft_only(segs, methods)
            per_query.append({"id": f"r{qi}", "context_tokens": res["full"]["prompt_tokens"], "methods": res})
            _log(args.quiet, f"[bench] query {qi + 1}/{len(prompts)}: "
                             + ", ".join(f"{k} {v['ttft_s']:.4f}s" for k, v in res.items()))
        scaling = []
        plot_methods = [Method("full", "full", None),
                        Method(method_name(args.plot_ratio), "cacheblend" if args.plot_ratio else "reuse",
                               args.plot_ratio if args.plot_ratio else None)]
        for n in plot_docs:
            rows = [bench.ttft_only(build_prompt(engine, [pool[i] for i in ids[:n]], qq), plot_methods)
                    for qq, ids in queries[: max(1, args.plot_queries)]]
            scaling.append(_scaling_point(n, rows, plot_methods))
            _log(args.quiet, f"[bench] plot {n} docs: {scaling[-1]['ttft_median_s']}")

    return {
        "model": name,
        "random_weights": True,
        "config": args.random_weights,
        "machine": machine_info(engine),
        "source": f"random tokens, {args.doc_tokens} tokens/doc",
        "store": type(engine.store).__name__ + (f" ({store_dir})" if store_dir else ""),
        "cold": bool(args.cold),
        "kv_bits": args.kv_bits,
        "n_queries": len(per_query),
        "docs_per_query": args.k,
        "context_tokens_median": _median(q["context_tokens"] for q in per_query),
        "timings_s": {"load": load_s, "warm": warm_s},
        "warm_report": _jsonable(warm),
        "methods": summarize(per_query, methods, has_gold=False),
        "scaling": scaling,
        "per_query": per_query,
    }


# ------------------------------------------------------------------------------------- CLI
def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--corpus", metavar="FILE.jsonl", help='corpus, one {"id", "text"} per line '
                   "(default: built-in pydoc topics, 250-400 tokens each)")
    g.add_argument("--queries", metavar="FILE.jsonl", help='queries, one {"id", "question"} per line, '
                   'optional "answer" (gold) and "doc_ids" (retrieval order); without doc_ids the '
                   "top k are retrieved with all-MiniLM-L6-v2 + FAISS")
    g.add_argument("--k", "--docs-per-query", dest="k", type=int, default=8,
                   help="documents per prompt (default 8)")
    g.add_argument("--max-queries", type=int, default=None, help="use the first N queries")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="HF id, local folder or .gguf (default SmolLM2-135M-Instruct)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ... (default auto)")
    m.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: engine's choice)")
    m.add_argument("--random-weights", metavar="CONFIG", default=None,
                   help="speed only, randomly initialized weights: a config JSON file or one of "
                        + ", ".join(RANDOM_CONFIGS))
    m.add_argument("--doc-tokens", type=int, default=350, help="random-weights: tokens per document")
    m.add_argument("--question-tokens", type=int, default=24, help="random-weights: tokens per question")
    s = p.add_argument_group("methods")
    s.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                   help="recompute ratios; 0 = reuse only (default 0,0.05,0.15,0.3,1)")
    s.add_argument("--answer-tokens", type=int, default=32, help="greedy answer length (default 32)")
    s.add_argument("--repeats", type=int, default=1, help="generate calls per method and prompt "
                   "(default 1); a prompt's TTFT is the lowest engine-measured sample, the fidelity "
                   "prefill counting as one more")
    s.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds over the first "
                   "prompt before measuring (default 1)")
    s.add_argument("--cold", action="store_true", help="fetch KV from a disk store (DiskStore), not memory")
    s.add_argument("--kv-bits", type=int, choices=(4, 8, 16), default=None,
                   help="store KV quantized (DiskStore kv_bits)")
    s.add_argument("--store-dir", default=None, help="directory of the disk store (default: a temp dir)")
    s.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT.json", default=None, help="write the full results here")
    o.add_argument("--plot-dir", default=None, help="where to write PNG plots (default: beside --json, else bench_out/)")
    o.add_argument("--plot-docs", default=",".join(map(str, DEFAULT_PLOT_DOCS)),
                   help="document counts for the TTFT-vs-context plot (default 2,4,8,16; '' to skip)")
    o.add_argument("--plot-ratio", type=float, default=0.15, help="recompute ratio plotted against full (default 0.15)")
    o.add_argument("--plot-queries", type=int, default=3, help="queries per point of the context plot (default 3)")
    o.add_argument("--no-plot", action="store_true", help="no plots (and no context sweep)")
    o.add_argument("--quiet", action="store_true", help="no progress on stderr")


_DESCRIPTION = ("Time to first token and fidelity (teacher-forced top-1, KL, exact match, F1) of KV "
                "reuse and CacheBlend against a full prefill of the same prompts, interleaved in one "
                "process. Without --corpus/--queries: built-in pydoc corpus and 20 questions.")


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="kvboost-rag bench", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on a CLI's ``add_subparsers()`` object."""
    p = subparsers.add_parser("bench", help="TTFT and fidelity of KV reuse vs full prefill",
                              description=_DESCRIPTION)
    return build_parser(p)


def run_from_args(args, *, engine=None) -> int:
    """Run the benchmark for parsed arguments (``engine``: reuse an already-built engine)."""
    for k, v in dict(corpus=None, queries=None, k=8, max_queries=None, model=None, device="auto",
                     dtype=None, random_weights=None, doc_tokens=350, question_tokens=24,
                     ratios="0,0.05,0.15,0.3,1", answer_tokens=32, repeats=1, warmup=1, cold=False,
                     kv_bits=None, store_dir=None, seed=0, json=None, plot_dir=None,
                     plot_docs="2,4,8,16", plot_ratio=0.15, plot_queries=3, no_plot=False,
                     quiet=False).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.k < 1:
        raise SystemExit("bench: --k must be >= 1")
    if args.warmup < 0 or args.repeats < 1 or args.answer_tokens < 1:
        raise SystemExit("bench: --warmup must be >= 0, --repeats and --answer-tokens >= 1")
    if not 0.0 <= args.plot_ratio <= 1.0:
        raise SystemExit("bench: --plot-ratio must be in [0, 1]")
    try:
        parse_ratios(args.ratios)
        parse_int_list(args.plot_docs, "--plot-docs")
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}")
    result = (run_random_bench(args, engine=engine) if args.random_weights
              else run_bench(args, engine=engine))

    if not args.no_plot:
        plot_dir = Path(args.plot_dir or (Path(args.json).parent if args.json else "bench_out"))
        stem = Path(args.json).stem if args.json else "bench"
        try:
            result["plots"] = write_plots(result, plot_dir, stem)
        except ImportError as exc:  # pragma: no cover - matplotlib missing
            _log(args.quiet, f"[bench] no plots: {exc}")
            result["plots"] = []
    print(format_table(result))
    if result.get("retrieval_recall_at_k") is not None:
        print(f"retrieval recall@{args.k} of the gold topic: {result['retrieval_recall_at_k']:.2f}")
    for p in result.get("plots", []):
        print(f"plot: {p}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
