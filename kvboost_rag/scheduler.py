"""Continuous batching: concurrent requests decode together, one model forward per step.

Without it, requests from several threads serialize under the engine's lock and interleave their
decode steps token by token, each step a batch of one. The :class:`Scheduler` (one per engine,
created on first use, run by one worker thread that exits when idle) instead:

1. takes a request from the waiting queue (bounded by ``EngineConfig.max_waiting``: beyond it
   :class:`~kvboost_rag.errors.SchedulerFullError`), runs its prefill or blend
   (:meth:`KVBoostEngine.prefill`) and samples its first token; **one prefill between two decode
   steps**, so waiting prompts never starve the answers being decoded, nor the reverse;
2. moves the prompt's KV into a row of a padded batch buffer (:class:`BatchKV`) and joins the batch;
3. runs one forward for every active request: each row feeds its last token at its own position,
   writes its K/V at its own length, and a 4D additive mask hides the rest of the row (padding of
   shorter rows, never another request's KV: rows are separate batch entries);
4. hands each row's logits to that request's own :func:`~kvboost_rag.generate.decode` generator,
   which applies its penalties, constraint, sampling, stop strings and cancellation exactly as for
   a request alone (its "model" is a stub returning the batched logits), and streams its deltas;
5. a finished request leaves at once (the last row moves into its place, so rows stay contiguous).

Memory: the buffers hold ``rows x capacity x per-token KV bytes`` (capacity: the longest prompt
plus its ``max_new_tokens``, rows allocated by doubling up to ``max_batch``); a prefilled request
joins only while that stays within ``EngineConfig.batch_kv_bytes``, else it waits for a request to
leave (a request alone always runs). Buffers are freed when the batch empties.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import GenerationCancelled, KVBoostError, SchedulerFullError
from .generate import GenerationResult, SamplingParams, decode
from .hf_compat import cache_kwargs

_IDLE_EXIT_S = 2.0       # the worker thread exits after this long with nothing to do
_POLL_S = 0.05           # how often a waiting consumer re-checks its own should_stop


RAGGED_ATTENTION = "kvboost_ragged"
_registered = False
_register_lock = threading.Lock()


def _ragged_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      kvboost_rows: Optional[list[int]] = None, **kwargs):
    """One decode step of a batch, attending each row over its own keys only.

    Registered as the attention implementation :data:`RAGGED_ATTENTION`, used only for the
    scheduler's batched steps of SDPA models. Row ``b`` (one query) runs the very SDPA call a
    request alone runs at that step, over ``key[b, :, :kvboost_rows[b]]``: no padding is read
    (a padded, masked call reads every row up to the longest and sums over the masked slots, so
    its float results differ in the last bits from the request alone), and grouped-query heads are
    not expanded. Anything else (no ``kvboost_rows``: another caller while the implementation is
    switched; several queries; position bias, soft-capping, sliding windows, sinks) goes to
    transformers' own SDPA path with the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (kvboost_rows is None or query.shape[2] != 1 or len(kvboost_rows) != query.shape[0]
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sliding_window", "s_aux"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and not _gqa_without_mask(key, value):
        # the alone path packs the query heads instead: run exactly that path, row by row
        outs = [sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, :n], value[b:b + 1, :, :n], None,
                                       dropout=dropout, scaling=scaling, **kwargs)[0]
                for b, n in enumerate(kvboost_rows)]
        return torch.cat(outs), None
    # What sdpa_attention_forward runs for one query without a mask (is_causal False, grouped heads
    # through enable_gqa), minus its per-call Python: this path runs rows x layers times a step.
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = {"enable_gqa": True} if groups > 1 else {}
    outs = [sdpa(query[b:b + 1], key[b:b + 1, :, :n], value[b:b + 1, :, :n], attn_mask=None, dropout_p=dropout,
                 scale=scaling, is_causal=False, **gqa)
            for b, n in enumerate(kvboost_rows)]
    return torch.cat(outs).transpose(1, 2).contiguous(), None


def _gqa_without_mask(key, value) -> bool:
    """Whether transformers' SDPA path uses ``enable_gqa`` for a call without a mask."""
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
    except ImportError:  # pragma: no cover - other transformers versions: take the exact path
        return False
    return bool(use_gqa_in_sdpa(None, key, value))


def _register_ragged() -> bool:
    """Register :func:`_ragged_attention` with transformers (once); False if this version lacks
    the interfaces (the batch then attends through the padded mask)."""
    global _registered
    with _register_lock:
        if not _registered:
            try:
                from transformers import AttentionInterface
                from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
            except ImportError:  # pragma: no cover - older transformers
                return False
            AttentionInterface.register(RAGGED_ATTENTION, _ragged_attention)
            # a forward by another caller while a batched step has the implementation switched
            # still gets SDPA's usual mask
            AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)
            _registered = True
    return True


class _NoCache:
    """What :func:`decode` is handed as its cache: the real KV lives in the batch buffer."""

    layers: list = []


class _RowModel:
    """A stand-in for the model inside one request's :func:`decode` generator: returns the logits
    the batched forward produced for this request's row."""

    def __init__(self) -> None:
        self.logits: Optional[torch.Tensor] = None

    def __call__(self, **_kwargs):
        logits, self.logits = self.logits, None
        if logits is None:  # pragma: no cover - a scheduler bug, never a user error
            raise RuntimeError("batched logits missing for this request")
        return SimpleNamespace(logits=logits.view(1, 1, -1))


class BatchKV:
    """Per-layer K/V buffers ``[slots, kv_heads, capacity, head_dim]``, one row per active request.

    Row ``b`` holds ``lengths[b]`` tokens at positions ``0..lengths[b]-1``. The attention module
    calls :meth:`update` with the step's ``[B, kv_heads, 1, head_dim]`` K/V: each row's entry is
    written at that row's length and the filled part of every row (up to the longest) is returned;
    :meth:`step_mask` hides, row by row, the slots past its own length."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self._mask: Optional[torch.Tensor] = None   # [slots, capacity] additive, kept up to date row by row
        self._rows = self._write = None
        self._kv_len = 0

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def _reallocate(self, slots: int, capacity: int, like_k: list, like_v: list) -> None:
        used = max(self.lengths, default=0)
        new_k, new_v = [], []
        for i, (k, v) in enumerate(zip(like_k, like_v)):
            # zeros, not empty: a masked slot still enters the product (0 x NaN garbage = NaN)
            nk = k.new_zeros((slots, k.shape[-3], capacity, k.shape[-1]))
            nv = v.new_zeros((slots, v.shape[-3], capacity, v.shape[-1]))
            if self.keys and self.size:
                nk[: self.size, :, :used].copy_(self.keys[i][: self.size, :, :used])
                nv[: self.size, :, :used].copy_(self.values[i][: self.size, :, :used])
            new_k.append(nk)
            new_v.append(nv)
        mask = new_k[0].new_full((slots, capacity), torch.finfo(new_k[0].dtype).min)
        if self._mask is not None and self.size:
            mask[: self.size, : self._mask.shape[1]].copy_(self._mask[: self.size])
        self.keys, self.values, self._mask = new_k, new_v, mask
        self._rows = None

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], need: int, max_slots: int) -> int:
        """Copy one prompt's per-layer ``[1, heads, n, d]`` K/V into a new row with room for
        ``need`` tokens in all; return the row index."""
        n = keys[0].shape[-2]
        if self.size >= self.slots or need > self.capacity:
            want = 2 * self.slots if self.size >= self.slots else self.slots
            slots = max(self.size + 1, min(max_slots, max(want, 1)))
            capacity = max(self.capacity, -(-need // 64) * 64)
            self._reallocate(slots, capacity, keys if not self.keys else self.keys,
                             values if not self.values else self.values)
        row = self.size
        for i in range(len(keys)):
            self.keys[i][row, :, :n].copy_(keys[i][0])
            self.values[i][row, :, :n].copy_(values[i][0])
        self._mask[row, :n] = 0
        self._mask[row, n:] = torch.finfo(self._mask.dtype).min
        self.lengths.append(n)
        self._rows = None
        return row

    def remove(self, row: int) -> Optional[int]:
        """Drop a row; the last row moves into its place. Returns the moved row's old index."""
        last = self.size - 1
        moved = None
        if row != last:
            n = self.lengths[last]
            for k, v in zip(self.keys, self.values):
                k[row, :, :n].copy_(k[last, :, :n])
                v[row, :, :n].copy_(v[last, :, :n])
            self._mask[row].copy_(self._mask[last])
            self.lengths[row] = n
            moved = last
        self.lengths.pop()
        self._rows = None
        if not self.lengths:  # nothing left: give the memory back
            self.keys, self.values, self._mask = [], [], None
        return moved

    def step_inputs(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids ``[B, 1]`` and the additive mask ``[B, 1, 1, longest + 1]`` of the next step.

        The mask is a view of a buffer kept up to date incrementally (a row is filled when it joins;
        each step unmasks the one slot it writes), not rebuilt over the whole capacity per step."""
        b = self.size
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self._mask.device)
        self._kv_len = max(self.lengths) + 1
        if self._rows is None or self._rows.numel() != b:
            self._rows = torch.arange(b, device=self._mask.device)
        self._write = lengths
        self._mask[self._rows, lengths] = 0  # this step's own token
        mask = self._mask[:b, : self._kv_len]
        if mask.dtype != dtype or mask.device != torch.device(device):
            mask = mask.to(device=device, dtype=dtype)
        return lengths.unsqueeze(1).to(device), mask[:, None, None, :]

    def valid_lengths(self) -> list[int]:
        """Keys each row attends in the coming step (its tokens plus the one it writes)."""
        return [n + 1 for n in self.lengths]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if key_states.dtype != k.dtype:
            key_states, value_states = key_states.to(k.dtype), value_states.to(v.dtype)
        k[self._rows, :, self._write, :] = key_states[:, :, 0, :]
        v[self._rows, :, self._write, :] = value_states[:, :, 0, :]
        b = self.size
        return k[:b, :, : self._kv_len], v[:b, :, : self._kv_len]

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths, default=0)


def batched_step(model, kv: BatchKV, ids: torch.Tensor, ragged: bool = True):
    """One forward for every row of ``kv``: row ``b`` feeds ``ids[b]`` at position ``kv.lengths[b]``
    and its K/V land at that slot; then the lengths advance. SDPA models (with ``ragged``) attend
    row by row over each row's own keys (:func:`_ragged_attention`), others through the padded
    mask. Call it under ``torch.inference_mode()`` and the engine's lock."""
    positions, mask = kv.step_inputs(kv.keys[0].dtype, ids.device)
    config = model.config
    previous = config._attn_implementation
    extra = {}
    if ragged and previous == "sdpa" and _register_ragged():
        config._attn_implementation = RAGGED_ATTENTION  # restored below; other callers fall back to SDPA
        extra["kvboost_rows"] = kv.valid_lengths()
    try:
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, **cache_kwargs(kv),
                    use_cache=True, **extra)
    finally:
        if extra:
            config._attn_implementation = previous
    kv.advance()
    return out


class Request:
    """One generation in the scheduler: its inputs, its event queue, its decode generator."""

    def __init__(self, prompt, params: SamplingParams, strategy, ratio, should_stop: Optional[Callable[[], bool]]):
        self.prompt, self.params, self.strategy, self.ratio = prompt, params, strategy, ratio
        self.should_stop = should_stop
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False
        self.submitted = time.perf_counter()
        self.pre = None
        self.gen: Optional[Iterator] = None
        self.model = _RowModel()
        self.token: Optional[int] = None     # the last sampled token: next step's input
        self.ids: list[int] = []
        self.parts: list[str] = []
        self.first_token_s = 0.0
        self.need = 0                        # KV tokens this request may hold (prompt + max_new_tokens)

    def stopped(self) -> bool:
        return self.abandoned or (self.should_stop is not None and bool(self.should_stop()))


def supports(model) -> bool:
    """Batched steps pass an explicit 4D additive mask: SDPA and eager attention take it (flash
    attention kernels do not; such models decode request by request)."""
    return getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


class Scheduler:
    """Admits requests from any thread and decodes them together in one worker thread."""

    def __init__(self, engine) -> None:
        self.engine = engine
        cfg = engine.config
        self.max_batch, self.max_waiting, self.kv_budget = cfg.max_batch, cfg.max_waiting, cfg.batch_kv_bytes
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._ready: collections.deque[Request] = collections.deque()  # prefilled, waiting for memory / a slot
        self._active: list[Request] = []      # row b of self.kv is self._active[b]
        self.kv = BatchKV()
        self._worker: Optional[threading.Thread] = None
        self._token_bytes = 0
        self.stats = collections.Counter()
        # Batched steps of SDPA models attend row by row over each row's own keys (see
        # _ragged_attention): the same float results as each request alone, and no padding read.
        self.ragged = _register_ragged()

    # ------------------------------------------------------------------ caller side
    def submit(self, request: Request) -> None:
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                self.stats["refused"] += 1
                raise SchedulerFullError(
                    f"{len(self._waiting)} requests are already waiting for this engine (max_waiting="
                    f"{self.max_waiting}); retry later, or raise max_waiting / max_batch in EngineConfig")
            self._waiting.append(request)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="kvboost-scheduler", daemon=True)
                self._worker.start()
            self._cv.notify()

    def run(self, prompt, params: SamplingParams, strategy, ratio,
            should_stop: Optional[Callable[[], bool]] = None) -> Iterator[tuple[str, Optional[GenerationResult]]]:
        """The same events as ``KVBoostEngine._run`` (text deltas, then ``("", result)``), produced
        by the worker; the caller's thread only waits on its queue."""
        req = Request(prompt, params, strategy, ratio, should_stop)
        self.submit(req)
        try:
            while True:
                try:
                    kind, item = req.events.get(timeout=_POLL_S)
                except queue.Empty:
                    if req.stopped():
                        raise GenerationCancelled("stopped while waiting for the batch") from None
                    continue
                if kind == "delta":
                    yield item, None
                elif kind == "done":
                    yield "", item
                    return
                else:
                    raise item
        finally:
            req.abandoned = True  # the worker drops it at its next step (or before its prefill)

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not (self._waiting or self._ready or self._active):
                    self._cv.wait(_IDLE_EXIT_S)
                    if not (self._waiting or self._ready or self._active):
                        self._worker = None
                        return
                nxt = None
                if not self._ready and self._waiting and len(self._active) < self.max_batch:
                    nxt = self._waiting.popleft()
            try:
                if nxt is not None:
                    self._prefill(nxt)
                self._admit_ready()
                if self._active:
                    self._step()
            except BaseException as exc:  # noqa: BLE001 - handed to every request concerned
                self._fail_all(exc)

    def _deliver_error(self, req: Request, exc: BaseException) -> None:
        req.events.put(("error", exc))

    def _fail_all(self, exc: BaseException) -> None:
        for req in list(self._active) + list(self._ready):
            self._deliver_error(req, exc)
        self._active.clear()
        self._ready.clear()
        self.kv = BatchKV()

    def _prefill(self, req: Request) -> None:
        if req.stopped():
            self._deliver_error(req, GenerationCancelled("stopped before the prefill"))
            return
        engine = self.engine
        try:
            t_start = time.perf_counter()
            req.pre = engine.prefill(req.prompt, req.strategy, req.ratio, max_new_tokens=req.params.max_new_tokens,
                                     should_stop=req.should_stop)
            req.queue_s = t_start - req.submitted
            req.gen = decode(req.model, engine.tokenizer, _NoCache(), req.pre.logits, len(req.pre.input_ids),
                             req.params, engine.eos_ids, should_stop=req.should_stop, prompt_ids=req.pre.input_ids)
            req.first_token_s = time.perf_counter() - req.submitted
            if self._advance(req):
                return
        except BaseException as exc:  # noqa: BLE001
            self._deliver_error(req, exc)
            return
        req.need = len(req.pre.input_ids) + req.params.max_new_tokens
        self._ready.append(req)

    def _reserved_bytes(self) -> int:
        """Bytes the batch buffers hold (rows allocated x capacity, zero-filled so really in use)."""
        return self.kv.slots * self.kv.capacity * self._token_bytes

    def _slot_limit(self, req: Request) -> int:
        """How many rows the buffers may have once ``req`` joins (0: it must wait)."""
        limit = self.max_batch
        if self.kv_budget and self._token_bytes:
            capacity = max(self.kv.capacity, -(-req.need // 64) * 64)
            limit = min(limit, self.kv_budget // (capacity * self._token_bytes))
        if self.kv.size >= limit and self._active:
            return 0
        return max(limit, self.kv.size + 1)  # a request alone always runs

    def _admit_ready(self) -> None:
        while self._ready and len(self._active) < self.max_batch:
            req = self._ready[0]
            if req.stopped():
                self._ready.popleft()
                self._deliver_error(req, GenerationCancelled("stopped before joining the batch"))
                continue
            layers = req.pre.cache.layers
            if not self._token_bytes:
                self._token_bytes = sum(l.keys[0, :, :1].numel() * l.keys.element_size()
                                        + l.values[0, :, :1].numel() * l.values.element_size() for l in layers)
            limit = self._slot_limit(req)
            if not limit:
                self.stats["waited_for_memory"] += 1
                return  # waits until a request leaves
            self._ready.popleft()
            self.kv.add([l.keys for l in layers], [l.values for l in layers], req.need, limit)
            req.pre.cache = None  # the batch buffer holds it now
            self._active.append(req)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self._active))

    def _leave(self, req: Request) -> None:
        row = self._active.index(req)
        moved = self.kv.remove(row)
        if moved is not None:
            self._active[row] = self._active[moved]
        self._active.pop()

    def _step(self) -> None:
        for req in [r for r in self._active if r.stopped()]:
            self._leave(req)
            self._deliver_error(req, GenerationCancelled("stopped"))
        if not self._active:
            return
        engine = self.engine
        device = engine.device
        with engine._lock, torch.inference_mode():
            ids = torch.tensor([[r.token] for r in self._active], device=device)
            out = batched_step(engine.model, self.kv, ids, ragged=self.ragged)
        logits = out.logits[:, -1]
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(self._active)
        for b, req in enumerate(list(self._active)):
            req.model.logits = logits[b]
        for req in list(self._active):
            try:
                done = self._advance(req)
            except BaseException as exc:  # noqa: BLE001 - this request's own failure (cancel, grammar)
                self._leave(req)
                self._deliver_error(req, exc)
                continue
            if done:
                self._leave(req)

    def _advance(self, req: Request) -> bool:
        """Run the request's decode generator one token; True once it finished."""
        token, delta, reason = next(req.gen)
        if reason != "eos":
            req.ids.append(token)
        if delta:
            req.parts.append(delta)
            req.events.put(("delta", delta))
        req.token = token
        if reason is None:
            return False
        total = time.perf_counter() - req.submitted
        result = self.engine._result(req.pre, req.params, req.ids, "".join(req.parts), reason,
                                     ttft=req.first_token_s, total=total)
        result.extra.update(queue_s=req.queue_s, prefill_s=req.pre.ttft_s, batched=True)
        req.events.put(("done", result))
        return True

    def snapshot(self) -> dict[str, Any]:
        """Counters and the current state (waiting, active, reserved KV bytes)."""
        with self._cv:
            return {**self.stats, "waiting": len(self._waiting), "ready": len(self._ready),
                    "active": len(self._active), "reserved_kv_bytes": self._reserved_bytes()}


__all__ = ["Scheduler", "BatchKV", "Request", "batched_step", "supports", "SchedulerFullError", "KVBoostError"]
