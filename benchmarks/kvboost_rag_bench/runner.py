"""The benchmark's measurements: TTFT and fidelity of KV reuse against a full prefill.

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
A context sweep times full prefill against one recompute ratio at several document counts (the
TTFT-vs-context plot of :mod:`kvboost_rag_bench.report`).

The multi-hop suite (``--suite multihop``) judges answers against the full prefill's: per method
the accuracy (overall, one-hop, two-hop, 95% CIs), the **retention** (of the questions the full
prefill answers correctly, the share the method also answers correctly; Wilson 95% CI; overall and
by hops, with counts such as ``41/55``) and the **verdict agreement** (share of questions with the
same right/wrong verdict). It always runs ``cacheblend@1`` (recompute ratio 1, same dtype) as
the **noise floor** unless ``--no-noise-floor``: the retention and agreement a method would get if
it differed from the full prefill only by numerical noise. ``--leakage N`` / ``--distractors N``
add the faithfulness guard's query sets (:func:`kvboost_rag_bench.multihop.guard_sets`).

Encodings (``--encodings context,isolated``): the documents are warmed once per encoding listed
(``isolated``: each document alone; ``context``: after its nearest corpus neighbours,
``engine.warm(texts, context="auto")``, over the whole corpus) and every method runs once per
encoding, pinned to it with ``EngineConfig.encodings``; the first listed keeps the method's name,
the others get a suffix (``default/isolated``). ``full`` and the noise floor run once (they do not
depend on stored KV). Where the core has no index-time context encoding the run falls back to
``isolated`` and says so (``result["encodings_requested"]`` vs ``result["encodings"]``).

Interleaving matters: running all ``full`` prompts, then all ``cacheblend`` ones, lets clock
boosts, other processes and allocator warm-up favour one method; here every prompt runs every
method back to back, after discarded warm-up rounds, and a prompt's TTFT is the lowest of its
engine-measured samples.

:func:`run_bench` drives a real model on a real corpus (:mod:`kvboost_rag_bench.datasets`);
:func:`run_random_bench` times a randomly initialized model of a given shape on random tokens
(:mod:`kvboost_rag_bench.random_models`). Both return a JSON-able dict; :mod:`kvboost_rag_bench.cli`
prints and saves it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from kvboost_rag.fidelity import kl_top1

from kvboost_rag_bench import datasets
from kvboost_rag_bench.metrics import contains_answer, mean, mean_ci95, median, share, token_f1, verdict_agreement
from kvboost_rag_bench.multihop import accuracy_by_hops, answers_agree, guard_sets, multihop_suite, retention_by_hops
from kvboost_rag_bench.random_models import (MAX_WORD_VOCAB, build_random_model, load_random_config, random_text,
                            resolve_device, word_count)
from kvboost_rag.testing.models import word_tokenizer

SYSTEM_PROMPT = ("You are a helpful assistant. Answer the question using only the documents "
                 "provided. Answer in a few words.")
DEFAULT_RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
DEFAULT_PLOT_DOCS = (2, 4, 8, 16)
DEFAULT_PLOT_RATIO = 0.15
ENCODINGS = ("context", "isolated")
NOISE_FLOOR = "cacheblend@1"


# --------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    strategy: Optional[str]         # None -> engine default
    ratio: Optional[float]
    overrides: tuple = ()           # (EngineConfig field, value) pairs set for this method only
    encoding: Optional[str] = None  # the stored encoding it reuses ("context"/"isolated"); None: not pinned

    def kwargs(self) -> dict:
        out: dict = {}
        if self.strategy is not None:
            out["strategy"] = self.strategy
        if self.ratio is not None:
            out["recompute_ratio"] = self.ratio
        return out


def parse_ratios(text: str) -> list[float]:
    """``"0,0.15,1"`` -> ``[0.0, 0.15, 1.0]`` (duplicates dropped); ``ValueError`` outside [0, 1]."""
    try:
        ratios = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ratios: expected comma-separated numbers in [0, 1], got {text!r}") from None
    for r in ratios:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"--ratios: {r} is outside [0, 1]")
    return list(dict.fromkeys(ratios))


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"16,2,4"`` -> ``[2, 4, 16]``; ``""``, ``"0"`` or ``"none"`` -> ``[]``; ``flag`` names errors."""
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


def build_methods(ratios: Sequence[float], selections: Sequence[str] = ()) -> list[Method]:
    """``full`` and ``default`` always, then one method per ratio (0 -> ``reuse``), then one per
    (extra selection rule, non-zero ratio), named ``rule@ratio``."""
    methods = [Method("full", "full", None), Method("default", None, None)]
    for r in ratios:
        if r == 0:
            methods.append(Method("reuse", "reuse", None))
        else:
            methods.append(Method(method_name(r), "cacheblend", float(r)))
    for rule in selections:
        methods += [Method(f"{rule}@{r:g}", "cacheblend", float(r), (("selection", rule),))
                    for r in ratios if r > 0]
    return methods


def is_noise_floor(method: Method) -> bool:
    """``cacheblend@1``: recompute ratio 1, the engine's own settings otherwise."""
    return method.strategy == "cacheblend" and method.ratio == 1.0 and not method.overrides


def with_noise_floor(methods: Sequence[Method]) -> list[Method]:
    """``methods`` with the noise floor (:data:`NOISE_FLOOR`, ratio 1) appended when missing
    (only it: no ``rule@1`` of the extra selection rules)."""
    methods = list(methods)
    if any(is_noise_floor(m) for m in methods):
        return methods
    return methods + [Method(NOISE_FLOOR, "cacheblend", 1.0)]


def parse_encodings(text: Optional[str]) -> list[str]:
    """``"context,isolated"`` -> ``["context", "isolated"]`` (order kept, duplicates dropped);
    ``ValueError`` for an empty list or another name."""
    names = [x.strip() for x in str(text or "").split(",") if x.strip()]
    bad = [n for n in names if n not in ENCODINGS]
    if bad or not names:
        raise ValueError(f"--encodings: expected a comma list of {list(ENCODINGS)}, got {text!r}")
    return list(dict.fromkeys(names))


def context_support(engine) -> bool:
    """Whether the core encodes documents in context: ``engine.warm(..., context=)``, the
    ``kvboost_rag.index.context`` module and ``EngineConfig.encodings`` (per-method pinning)."""
    try:
        from kvboost_rag.config import EngineConfig

        return (importlib.util.find_spec("kvboost_rag.index.context") is not None
                and "encodings" in EngineConfig.__dataclass_fields__
                and "context" in inspect.signature(engine.warm).parameters)
    except Exception:  # pragma: no cover - a core mid-change
        return False


def encoding_methods(methods: Sequence[Method], encodings: Sequence[str], *, pin: bool = True) -> list[Method]:
    """Every method once per encoding: the first listed keeps the method's name, the others are
    named ``name/encoding``, right after it. With ``pin``, each gets ``encodings=(that,)`` in its
    engine settings. ``full`` (no stored KV), the noise floor (ratio 1: the stored values are
    recomputed, so the encoding does not matter beyond noise) and methods
    that set ``encodings`` themselves run once, unchanged."""
    out = []
    for m in methods:
        fixed = (m.strategy == "full" or is_noise_floor(m)
                 or any(field == "encodings" for field, _ in m.overrides))
        if fixed:
            out.append(m)
            continue
        for i, enc in enumerate(encodings):
            name = m.name if i == 0 else f"{m.name}/{enc}"
            overrides = m.overrides + ((("encodings", (enc,)),) if pin else ())
            out.append(dataclasses.replace(m, name=name, overrides=overrides, encoding=enc))
    return out


def parse_variants(specs: Sequence[str]) -> list[Method]:
    """``NAME=field:value,field:value`` -> a ``cacheblend`` method with those EngineConfig fields
    (numbers parsed as such), e.g. ``docs20=selection:attention_docs,recompute_ratio:0.2``."""
    from kvboost_rag.config import EngineConfig

    known = set(EngineConfig.__dataclass_fields__) | set(EngineConfig().blend.__dataclass_fields__)
    methods = []
    for spec in specs or ():
        name, _, body = str(spec).partition("=")
        pairs = []
        for item in filter(None, body.split(",")):
            field, _, raw = item.partition(":")
            if field not in known or not raw:
                raise ValueError(f"--variant {spec!r}: expected field:value with a field of {sorted(known)}")
            try:
                value = float(raw) if "." in raw else int(raw)
            except ValueError:
                value = raw
            pairs.append((field, value))
        if not name or not pairs:
            raise ValueError(f"--variant {spec!r}: expected NAME=field:value[,field:value...]")
        fields = dict(pairs)
        if str(fields.get("selection", "")) not in ("", *_known_rules()):
            parse_selections(fields["selection"])  # registers a lever or raises for an unknown rule
        EngineConfig().replace(**fields)  # validates now, not in the middle of a run
        methods.append(Method(name, "cacheblend", None, tuple(pairs)))
    return methods


def _known_rules() -> list:
    from kvboost_rag.blend import SELECTION_RULES

    return list(SELECTION_RULES)


def parse_selections(text: Optional[str]) -> list[str]:
    """``"attention_docs,value"`` -> rule names, each in the core registry or a lever of
    :mod:`kvboost_rag_bench.levers` (registered on first use); ``ValueError`` for unknown names."""
    from kvboost_rag.blend import SELECTION_RULES

    from kvboost_rag_bench.levers import LEVERS, register_levers

    names = [x.strip() for x in str(text or "").split(",") if x.strip()]
    unknown = [n for n in names if n not in SELECTION_RULES and n not in LEVERS]
    if unknown:
        raise ValueError(f"--selections: unknown rule(s) {unknown}; known: {sorted({*SELECTION_RULES, *LEVERS})}")
    if any(n in LEVERS for n in names):
        register_levers()
    return list(dict.fromkeys(names))


def sweep_methods(ratio: float) -> list[Method]:
    """The context sweep's methods: ``full`` and the plotted ratio (0 -> ``reuse``)."""
    methods = build_methods([ratio])
    return [methods[0], methods[-1]]


# --------------------------------------------------------------------------------- prompts
def build_prompt(engine, doc_texts: Sequence[str], question: str, system: str = SYSTEM_PROMPT):
    """Explicit segments: system instruction, documents in the given order, then the question
    (``chat_segments`` joins the parts of a message with a blank line)."""
    from kvboost_rag import Segment

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


# ------------------------------------------------------------------------------- runner
def log(quiet: bool, *msg) -> None:
    """Progress on stderr unless ``quiet``."""
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

    @contextlib.contextmanager
    def _configured(self, method: Method):
        """The engine with ``method.overrides`` applied for the duration (single-threaded bench)."""
        saved = self.engine.config
        if method.overrides:
            self.engine.config = saved.replace(**dict(method.overrides))
        try:
            yield
        finally:
            self.engine.config = saved

    def _generate(self, segments, method: Method):
        with self._configured(method):
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
            row["agrees_with_full"] = float(answers_agree(res.text, full_text, gold))
            if self.fidelity:
                with self._configured(method):
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
        with self._configured(method):
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
            return mean([r[key] / p if p else None for r, p in zip(rows, prompt)])

        entry: dict = {
            "encoding": m.encoding,
            "strategy": m.strategy if m.strategy is not None else (rows[0].get("strategy") if rows else None),
            "recompute_ratio": m.ratio if m.ratio is not None else (rows[0].get("recompute_ratio") if rows else None),
            "ttft_median_s": median(r["ttft_s"] for r in rows),
            "ttft_mean_s": mean(r["ttft_s"] for r in rows),
            "speedup_vs_full": median(ratios),
            "reused_fraction": frac("reused_tokens"),
            "recomputed_fraction": frac("recomputed_tokens"),
            "fresh_fraction": frac("fresh_tokens"),
        }
        if rows and "exact_match" in rows[0]:
            entry.update({
                "greedy_exact_match": mean(r["exact_match"] for r in rows),
                "answer_f1": mean(r["f1"] for r in rows) if has_gold else None,
                "answer_contains_gold": mean(r.get("contains_answer") for r in rows) if has_gold else None,
            })
        if rows and "kl" in rows[0]:
            kl_mean, kl_ci = mean_ci95([r["kl"] for r in rows], lower=0.0)
            entry.update({"top1_agreement": mean(r["top1"] for r in rows), "kl_mean": kl_mean, "kl_ci95": kl_ci})
        if has_gold and rows and "agrees_with_full" in rows[0]:
            hops = [q.get("hops") for q in per_query]
            by_hops = accuracy_by_hops({"hops": h, "correct": r["contains_answer"]} if h else
                                       {"correct": r["contains_answer"]} for h, r in zip(hops, rows))
            agree, agree_ci = mean_ci95([r["agrees_with_full"] for r in rows])
            entry.update({
                "answer_accuracy": by_hops["overall"]["accuracy"],
                "answer_accuracy_ci95": by_hops["overall"]["ci95"],
                "agreement_with_full": agree,
                "agreement_ci95": agree_ci,
            })
            if any(hops):
                entry["accuracy_one_hop"] = by_hops["one_hop"]["accuracy"]
                entry["accuracy_one_hop_ci95"] = by_hops["one_hop"]["ci95"]
                entry["accuracy_two_hop"] = by_hops["two_hop"]["accuracy"]
                entry["accuracy_two_hop_ci95"] = by_hops["two_hop"]["ci95"]
            entry.update(judge_against_full([f.get("contains_answer") for f in fulls],
                                             [r.get("contains_answer") for r in rows], hops))
        if rows and "prefill_ttft_s" in rows[0]:
            entry["prefill_ttft_median_s"] = median(r["prefill_ttft_s"] for r in rows)
        summary[m.name] = entry
    return summary


def judge_against_full(full: Sequence, method: Sequence, hops: Sequence) -> dict:
    """A method's right/wrong verdicts judged against the full prefill's (same question order):
    ``retention`` (share of the full prefill's correct answers the method keeps), overall and per
    hop count (``retention_one_hop`` / ``retention_two_hop`` when hop counts are known), each with
    ``*_ci95`` (Wilson) and ``*_count`` (``"41/55"``), and ``verdict_agree`` (share of questions
    with the same verdict) with ``verdict_agree_ci95`` / ``verdict_agree_count``. Values are
    ``None`` (counts ``"0/0"``) when there is nothing to judge."""
    ret = retention_by_hops(list(full), list(method), [h if h else None for h in hops])
    agree = verdict_agreement(list(full), list(method))
    out = {}
    groups = [("overall", "retention")]
    if any(hops):
        groups += [("one_hop", "retention_one_hop"), ("two_hop", "retention_two_hop")]
    for group, key in groups:
        out[key], out[f"{key}_ci95"], out[f"{key}_count"] = (ret[group]["share"], ret[group]["ci95"],
                                                              ret[group]["count"])
    out["verdict_agree"], out["verdict_agree_ci95"], out["verdict_agree_count"] = (
        agree["share"], agree["ci95"], agree["count"])
    return out


def summarize_leakage(per_query: list[dict], methods: Sequence[Method]) -> dict:
    """Per method on the leakage set: ``leak_rate`` (share of questions answered correctly though
    no document given holds the answer), ``leak_ci95`` (Wilson), ``leaks`` (``"k/n"``); where it
    is known whether the answer document was in the index-time context of a retrieved document
    (``answer_doc_in_context`` of the per-query rows), the leaks split by it:
    ``leaks_answer_in_context`` / ``leaks_answer_not_in_context`` (``"k/n"``)."""
    known = [q.get("answer_doc_in_context") for q in per_query]
    out = {}
    for m in methods:
        flags = [q["methods"][m.name].get("contains_answer") for q in per_query]
        s = share(flags)
        entry = {"encoding": m.encoding, "leak_rate": s["share"], "leak_ci95": s["ci95"], "leaks": s["count"]}
        if any(k is not None for k in known):
            entry["leaks_answer_in_context"] = share([f for f, k in zip(flags, known) if k is True])["count"]
            entry["leaks_answer_not_in_context"] = share([f for f, k in zip(flags, known) if k is False])["count"]
        out[m.name] = entry
    return out


_GUARD_KEYS = ("encoding", "answer_accuracy", "answer_accuracy_ci95", "accuracy_one_hop", "accuracy_one_hop_ci95",
               "accuracy_two_hop", "accuracy_two_hop_ci95", "retention", "retention_ci95", "retention_count",
               "retention_one_hop", "retention_one_hop_ci95", "retention_one_hop_count", "retention_two_hop",
               "retention_two_hop_ci95", "retention_two_hop_count", "verdict_agree", "verdict_agree_ci95",
               "verdict_agree_count", "agreement_with_full", "noise_floor")


def summarize_distractors(per_query: list[dict], methods: Sequence[Method]) -> dict:
    """Per method on the random-distractor set: accuracy (overall and by hops) and its judgement
    against the full prefill (:func:`judge_against_full`)."""
    full = summarize(per_query, methods, has_gold=True)
    return {name: {k: v for k, v in m.items() if k in _GUARD_KEYS} for name, m in full.items()}


# ---------------------------------------------------------------------------------- stores
def make_store(args) -> tuple[Any, Optional[str]]:
    """The store to benchmark with. Returns ``(store, directory)``.

    * neither ``--cold`` nor ``--kv-bits``: ``None`` (the engine's default memory store);
    * ``--cold``: a :class:`kvboost_rag.store.disk.DiskStore` alone, so every query reads its
      chunks from disk (OS page cache aside), in the store's own ``kv_bits`` (int8 for a new
      store) unless ``--kv-bits`` says otherwise;
    * ``--kv-bits`` without ``--cold``: a memory tier over a quantized DiskStore
      (``TieredStore``), so queries use exactly the quantized-then-dequantized KV from memory.
    """
    if not args.cold and args.kv_bits is None:
        return None, None
    from kvboost_rag.store.disk import DiskStore, TieredStore
    from kvboost_rag.store.memory import MemoryStore

    path = args.store_dir or tempfile.mkdtemp(prefix="kvboost-bench-")
    disk = DiskStore(path, kv_bits=args.kv_bits)
    if args.cold:
        return disk, str(path)
    return TieredStore(MemoryStore(None), disk), str(path)


# ---------------------------------------------------------------------------------- driver
def _load_engine(args, store):
    from kvboost_rag import KVBoostEngine

    kw: dict = {"device": args.device}
    if args.dtype:
        kw["dtype"] = args.dtype
    if store is not None:
        kw["store"] = store
    return KVBoostEngine.from_pretrained(args.model, **kw)


def _dataset(args, engine) -> tuple[list, list, str]:
    if bool(args.corpus) != bool(args.queries):
        raise SystemExit("bench: give both --corpus and --queries, or neither (built-in corpus)")
    if args.corpus:
        docs, queries = datasets.load_corpus(args.corpus), datasets.load_queries(args.queries)
        source = f"{args.corpus} + {args.queries}"
    elif args.suite == "multihop":
        docs, queries = multihop_suite(n_questions=args.suite_size, seed=args.seed, docs_per_query=args.k)
        source = f"multihop:seed={args.seed},n={args.suite_size}"
    else:
        docs, queries = datasets.builtin_dataset(lambda t: len(engine.tokenize_document(t)))
        source = "builtin:pydoc_data.topics"
    offset = getattr(args, "query_offset", 0) or 0
    if offset:
        queries = queries[offset:]
    if args.max_queries:
        queries = queries[: args.max_queries]
    return docs, queries, source


def _is_multihop(args) -> bool:
    return getattr(args, "suite", None) == "multihop" and not getattr(args, "corpus", None)


def _guard_queries(args) -> dict:
    """``--leakage`` / ``--distractors``: the multihop suite's guard sets (empty when both are 0)."""
    n_leak, n_rand = int(getattr(args, "leakage", 0) or 0), int(getattr(args, "distractors", 0) or 0)
    if not (n_leak or n_rand):
        return {"leakage": [], "random_distractors": []}
    if not _is_multihop(args):
        raise SystemExit("bench: --leakage / --distractors need --suite multihop (and no --corpus)")
    return guard_sets(n_questions=args.suite_size, seed=args.seed, docs_per_query=args.k,
                      leakage=n_leak, distractors=n_rand)


def _warm_summary(report, wall_s: float) -> dict:
    get = lambda name: getattr(report, name, 0) or 0  # noqa: E731 - fields the core may not have yet
    return {"documents": get("documents"), "encoded": get("encoded"), "skipped": get("skipped"),
            "seconds": float(get("seconds")), "wall_s": wall_s, "tokens": get("tokens"),
            "context_encoded": get("context_encoded"), "context_tokens": get("context_tokens"),
            "failed": len(getattr(report, "failed", None) or [])}


def context_setting(args) -> Any:
    """The ``context=`` the benchmark warms its context encoding with: ``"auto"`` (warm_corpus's
    default) unless the context settings say otherwise."""
    from kvboost_rag.app.commands import context_from_args
    from kvboost_rag.index.context import ContextConfig

    defaults = dict(context_docs=3, context_tokens=None, context_order="nearest_last", context_kv="stored")
    cfg = context_from_args(argparse.Namespace(**{k: getattr(args, k, v) for k, v in defaults.items()}))
    return "auto" if cfg == ContextConfig() else cfg


def warm_encodings(engine, texts: Sequence[str], encodings: Sequence[str], quiet: bool = True,
                   context: Any = "auto") -> tuple[dict, dict]:
    """Warm ``texts`` once per encoding (``isolated``: ``engine.warm(texts)``; ``context``:
    ``engine.warm(texts, context="auto")``). Before the timed warms, one untimed encode of the
    first text (kernels, allocator) and, for ``context``, the embedding model is loaded (its load
    time is ``embedder_load_s``, not in the context warm). Returns ``(reports, summary)``:
    ``{encoding: WarmReport}`` and ``{encoding: {documents, encoded, seconds, wall_s, tokens,
    context_encoded, context_tokens, ...}, "context_vs_isolated": ratio or None, "embedder_load_s"}``."""
    summary: dict = {}
    reports: dict = {}
    if texts:
        try:
            engine.encode_batch([texts[0]])
        except Exception:  # pragma: no cover - only a warm-up
            pass
    if "context" in encodings:
        from kvboost_rag.index.context import packaged_minilm

        t0 = time.perf_counter()
        packaged_minilm()
        summary["embedder_load_s"] = time.perf_counter() - t0
    for enc in sorted(encodings, key=lambda e: e != "isolated"):  # isolated first: a "stored" context reuses it
        t0 = time.perf_counter()
        rep = engine.warm(list(texts), context=context) if enc == "context" else engine.warm(list(texts))
        reports[enc] = rep
        summary[enc] = _warm_summary(rep, time.perf_counter() - t0)
        log(quiet, f"[bench] warmed {summary[enc]['encoded']} documents ({enc}) in {summary[enc]['seconds']:.1f}s"
                   + (f", {summary[enc]['context_tokens']} context tokens" if enc == "context" else ""))
    iso, ctx = summary.get("isolated"), summary.get("context")
    # a context warm from an empty store: with neighbour_kv="stored" it includes the isolated warm
    stored = getattr(context, "neighbour_kv", "computed") == "stored"
    if ctx and iso:
        ctx["from_scratch_s"] = ctx["seconds"] + (iso["seconds"] if stored else 0.0)
    summary["context_vs_isolated"] = (ctx["from_scratch_s"] / iso["seconds"]
                                      if iso and ctx and iso["encoded"] and iso["encoded"] == ctx["encoded"]
                                      and iso["seconds"] > 0 else None)
    return reports, summary


def context_of(engine, text: str) -> Optional[list]:
    """The store keys of the documents ``text`` was encoded after (its context entry's
    ``meta["context"]``); None when there is no context entry or it carries no such metadata."""
    try:
        chunk = engine.store.get(engine.key_for_text(text, encoding="context"), engine.fingerprint)
    except Exception:
        return None
    meta = getattr(chunk, "meta", None) if chunk is not None else None
    if not meta or "context" not in meta:
        return None
    return [k for k in str(meta["context"]).split(",") if k]


def answer_in_context(engine, answer_text: str, retrieved: Sequence[tuple]) -> tuple[Optional[bool], list]:
    """Whether the answer document (its isolated key) is in the index-time context of one of the
    ``retrieved`` ``(doc_id, text)`` documents: ``(flag or None when no context metadata is
    available, [ids of the retrieved documents whose context holds it])``."""
    try:
        answer_key = engine.key_for_text(answer_text)
    except Exception:  # pragma: no cover
        return None, []
    contexts = [(doc_id, context_of(engine, text)) for doc_id, text in retrieved]
    if all(c is None for _, c in contexts):
        return None, []
    holders = [doc_id for doc_id, c in contexts if c and answer_key in c]
    return bool(holders), holders


def _run_queries(bench: "Bench", engine, queries: Sequence, methods: Sequence[Method], by_id: dict, k: int,
                 quiet: bool, label: str, prompts: Optional[Sequence] = None,
                 partial: Optional[str] = None) -> list[dict]:
    """Every method on every query (interleaved per prompt); one per-query row each. ``partial``:
    a JSONL file each row is appended to as soon as it is measured (a long run stopped early
    keeps what it measured)."""
    per_query = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        segs = (prompts[i] if prompts is not None
                else build_prompt(engine, [by_id[d].text for d in q.doc_ids[:k]], q.question))
        res = bench.run_query(segs, methods, gold=q.answer)
        full_text = res.pop("_full_text")
        per_query.append({"id": q.id, "question": q.question, "answer": q.answer,
                          "hops": (q.meta or {}).get("hops"), "doc_ids": q.doc_ids[:k],
                          "context_tokens": res["full"]["prompt_tokens"],
                          "full_answer": full_text, "methods": res})
        if partial:
            with open(partial, "a") as f:
                f.write(json.dumps({"set": label, **_strip_ids(per_query[-1])}, default=str) + "\n")
        log(quiet, f"[bench] {label} {i + 1}/{len(queries)} ({res['full']['prompt_tokens']} tokens) "
                   f"in {time.perf_counter() - t0:.1f}s: full {res['full']['ttft_s']:.3f}s, "
                   + ", ".join(f"{n} {v['ttft_s']:.3f}s" for n, v in res.items() if n != "full"))
    return per_query


def run_bench(args, *, engine=None) -> dict:
    """The real-model benchmark (``engine``: an already-built engine, else loaded from
    ``--model``). Returns the JSON-able result."""
    import torch

    ratios = parse_ratios(args.ratios)
    multihop = _is_multihop(args)
    plot_docs = [] if args.no_plot else parse_int_list(args.plot_docs, "--plot-docs")
    base_methods = build_methods(ratios, parse_selections(args.selections))
    if multihop and getattr(args, "noise_floor", True):
        base_methods = with_noise_floor(base_methods)
    base_methods += parse_variants(args.variant)
    requested = parse_encodings(getattr(args, "encodings", "context"))
    guard = _guard_queries(args)
    store, store_dir = make_store(args)
    t0 = time.perf_counter()
    if engine is None:
        engine = _load_engine(args, store)
    load_s = time.perf_counter() - t0
    log(args.quiet, f"[bench] loaded {engine.model_name} in {load_s:.1f}s")

    has_context = context_support(engine)
    encodings = requested if has_context else ["isolated"]
    if encodings != requested:
        log(args.quiet, f"[bench] this core has no index-time context encoding: --encodings {','.join(requested)} "
                        "runs with isolated encoding only")
    methods = encoding_methods(base_methods, encodings, pin=has_context)

    docs, queries, source = _dataset(args, engine)
    by_id = {d.id: d for d in docs}
    need_k = max([args.k] + plot_docs)
    retrieval = "doc_ids" if all(q.doc_ids is not None for q in queries) else "all-MiniLM-L6-v2 + FAISS"
    t0 = time.perf_counter()
    datasets.attach_doc_ids(docs, queries, need_k)
    retrieve_s = time.perf_counter() - t0
    with_topic = [q for q in queries if q.topic]
    recall = (mean(float(q.topic in q.doc_ids[: args.k]) for q in with_topic) if with_topic else None)

    with torch.inference_mode():
        guard_queries = guard["leakage"] + guard["random_distractors"]
        if "context" in encodings:   # neighbours are drawn from the texts warmed: the whole corpus
            warm_ids = [d.id for d in docs]
        else:
            warm_ids = list(dict.fromkeys(d for q in [*queries, *guard_queries] for d in q.doc_ids[: need_k]))
        log(args.quiet, f"[bench] warming {len(warm_ids)} documents"
                        + (" (the whole corpus: context neighbours are drawn from it)" if "context" in encodings else "")
                        + f", encodings: {', '.join(encodings)}")
        t0 = time.perf_counter()
        warm_reports, warm_summary = warm_encodings(engine, [by_id[d].text for d in warm_ids], encodings,
                                                    quiet=args.quiet, context=context_setting(args))
        warm_s = time.perf_counter() - t0
        log(args.quiet, f"[bench] warmed {len(warm_ids)} documents x {len(encodings)} encoding(s) in {warm_s:.1f}s")

        bench = Bench(engine, answer_tokens=args.answer_tokens, repeats=args.repeats, fidelity=args.fidelity,
                      quiet=args.quiet)
        prompts = [build_prompt(engine, [by_id[d].text for d in q.doc_ids[: args.k]], q.question)
                   for q in queries]
        for _ in range(args.warmup):          # discarded warm-up round(s)
            bench.run_query(prompts[0], methods, gold=None)
        partial = f"{args.json}.partial.jsonl" if getattr(args, "json", None) else None
        if partial:  # a fresh file per run; removed once the run's JSON holds every row
            os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
            open(partial, "w").close()
        per_query = _run_queries(bench, engine, queries, methods, by_id, args.k, args.quiet, "query", prompts, partial)

        # the faithfulness guard: answers only (no teacher-forced pass)
        answers_only = Bench(engine, answer_tokens=args.answer_tokens, repeats=1, fidelity=False, quiet=args.quiet)
        leakage = None
        if guard["leakage"]:
            rows = _run_queries(answers_only, engine, guard["leakage"], methods, by_id, args.k, args.quiet, "leakage",
                                partial=partial)
            for row, q in zip(rows, guard["leakage"]):
                row["answer_doc"], row["replacement"] = q.meta["answer_doc"], q.meta["replacement"]
                flag, holders = (answer_in_context(engine, by_id[q.meta["answer_doc"]].text,
                                                   [(d, by_id[d].text) for d in q.doc_ids[: args.k]])
                                 if "context" in encodings else (None, []))
                row["answer_doc_in_context"], row["answer_doc_in_context_of"] = flag, holders
            known = [r["answer_doc_in_context"] for r in rows if r["answer_doc_in_context"] is not None]
            leakage = {"n_questions": len(rows),
                       "answer_doc_in_context": (share(known)["count"] if known else None),
                       "methods": summarize_leakage(rows, methods),
                       "per_query": [_strip_ids(q) for q in rows]}
        distractors = None
        if guard["random_distractors"]:
            rows = _run_queries(answers_only, engine, guard["random_distractors"], methods, by_id, args.k,
                                args.quiet, "random distractors", partial=partial)
            for row, q in zip(rows, guard["random_distractors"]):
                row["needed"] = q.meta["needed"]
            distractors = {"n_questions": len(rows), "methods": summarize_distractors(rows, methods),
                           "per_query": [_strip_ids(q) for q in rows]}

        profile = None
        if getattr(args, "profile", False):
            from kvboost_rag_bench.profile import profile_methods

            profile = {}
            for m in methods:   # each under its own engine settings (variants, pinned encodings)
                with bench._configured(m):
                    profile.update(profile_methods(engine, prompts, [m]))
            log(args.quiet, "[bench] profiled the prefills")

        scaling = []
        if plot_docs:
            plot_methods = sweep_methods(args.plot_ratio)
            pq = queries[: max(1, args.plot_queries)]
            for n in plot_docs:
                rows = []
                for q in pq:
                    if len(q.doc_ids) < n:
                        continue
                    segs = build_prompt(engine, [by_id[d].text for d in q.doc_ids[:n]], q.question)
                    rows.append(bench.ttft_only(segs, plot_methods))
                if not rows:
                    log(args.quiet, f"[bench] plot: no query has {n} documents, skipped")
                    continue
                scaling.append(_scaling_point(n, rows, plot_methods))
                log(args.quiet, f"[bench] plot {n} docs: {scaling[-1]['ttft_median_s']}")

    if partial and os.path.exists(partial):
        os.remove(partial)
    has_gold = any(q.answer is not None for q in queries)
    summary = summarize(per_query, methods, has_gold=has_gold)
    # the noise floor: cacheblend@1 of a multihop run (added there unless --no-noise-floor)
    floor = (next((m.name for m in methods if is_noise_floor(m)), None)
             if multihop and getattr(args, "noise_floor", True) else None)
    for table in (summary, (distractors or {}).get("methods") or {}, (leakage or {}).get("methods") or {}):
        if floor in table:
            table[floor]["noise_floor"] = True
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
        "context_tokens_median": median(q["context_tokens"] for q in per_query),
        "encodings": list(encodings),
        "context_config": repr(context_setting(args)),
        "encodings_requested": list(requested),
        "context_encoding_available": has_context,
        "noise_floor": floor,
        "timings_s": {"load": load_s, "retrieve": retrieve_s, "warm": warm_s},
        "warm_report": _jsonable(warm_reports.get(encodings[0])),
        "warm": warm_summary,
        "methods": summary,
        "leakage": leakage,
        "random_distractors": distractors,
        "scaling": scaling,
        "profile": profile,
        "per_query": [_strip_ids(q) for q in per_query],
    }
    return result


def _scaling_point(n: int, rows: list[dict], methods: Sequence[Method]) -> dict:
    return {
        "n_docs": n,
        "n_queries": len(rows),
        "context_tokens_median": median(r["full"]["prompt_tokens"] for r in rows),
        "ttft_median_s": {m.name: median(r[m.name]["ttft_s"] for r in rows) for m in methods},
        "speedup_vs_full": {m.name: median(r["full"]["ttft_s"] / r[m.name]["ttft_s"] for r in rows)
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
        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def run_random_bench(args, *, engine=None) -> dict:
    """Speed only, randomly initialized weights of a given config shape, random-token corpus."""
    import torch
    from kvboost_rag import KVBoostEngine

    ratios = parse_ratios(args.ratios)
    plot_docs = [] if args.no_plot else parse_int_list(args.plot_docs, "--plot-docs")
    methods = build_methods(ratios)
    store, store_dir = make_store(args)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if engine is None:
        config = load_random_config(args.random_weights)
        model = build_random_model(config, device=device, dtype=args.dtype, seed=args.seed)
        tok = word_tokenizer(min(int(config.vocab_size), MAX_WORD_VOCAB))
        kw = {} if store is None else {"store": store}
        engine = KVBoostEngine(model, tok, **kw)
    load_s = time.perf_counter() - t0
    name = f"random:{args.random_weights}"
    log(args.quiet, f"[bench] built {name} on {device} in {load_s:.1f}s")

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
            log(args.quiet, f"[bench] query {qi + 1}/{len(prompts)}: "
                             + ", ".join(f"{k} {v['ttft_s']:.4f}s" for k, v in res.items()))
        scaling = []
        plot_methods = sweep_methods(args.plot_ratio)
        for n in plot_docs:
            rows = [bench.ttft_only(build_prompt(engine, [pool[i] for i in ids[:n]], qq), plot_methods)
                    for qq, ids in queries[: max(1, args.plot_queries)]]
            scaling.append(_scaling_point(n, rows, plot_methods))
            log(args.quiet, f"[bench] plot {n} docs: {scaling[-1]['ttft_median_s']}")

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
        "context_tokens_median": median(q["context_tokens"] for q in per_query),
        "timings_s": {"load": load_s, "warm": warm_s},
        "warm_report": _jsonable(warm),
        "methods": summarize(per_query, methods, has_gold=False),
        "scaling": scaling,
        "per_query": per_query,
    }


