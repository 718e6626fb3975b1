"""Continuous batching: concurrent requests decode together, one model forward per step.

Without it, requests from several threads serialize under the engine's lock and interleave their
decode steps token by token, each step a batch of one. The :class:`Scheduler` (one per engine,
created on first use) instead runs rounds, each:

1. takes a request from the waiting queue (bounded by ``EngineConfig.max_waiting``: beyond it
   :class:`~kvboost_rag.errors.SchedulerFullError`), runs its prefill or blend
   (:meth:`KVBoostEngine.prefill`) and samples its first token; **one prefill per round**, so
   waiting prompts never starve the answers being decoded, nor the reverse;
2. moves the prompt's KV into a row of a padded batch buffer (:class:`BatchKV`) and joins the batch;
3. runs one forward for every active request (:func:`batched_step`): each row feeds its last token
   at its own position and writes its K/V at its own length. SDPA models attend **row by row over
   each row's own keys** (:func:`_ragged_attention`, switched in for that forward only): the very
   SDPA call the request alone runs, so every row's logits are bit for bit those of its request
   alone (measured on SmolLM2 bf16; float32 matmuls of several rows may round differently in the
   last bit), no padding is read and grouped-query heads are not expanded. Eager models attend
   through a 4D additive mask that hides, row by row, the slots past its length (kept up to date
   incrementally, not rebuilt per step);
4. hands each row's logits to that request's own :func:`~kvboost_rag.decode.loop.decode` generator,
   which applies its penalties, constraint, sampling, stop strings and cancellation exactly as for
   a request alone (its "model" is a stub returning the batched logits), and streams its deltas;
5. a finished request leaves at once (the last row moves into its place, so rows stay contiguous).

Who runs the rounds: a lone request (nothing else queued or decoding) is driven by its caller's
own thread between its yields, as fast as ``batching=False``; the moment another request arrives
a worker thread takes over all of them (it never waits for a consumer that stopped reading), and
exits when idle. Worker threads are stopped and joined at interpreter exit.

Where the time goes (SmolLM2-135M bf16, one thread, 8 prompts of ~2.9k tokens): a step costs ~64 ms
for one row and ~142 ms for eight, of which ~80 ms is attention (each row reads its own ~2.9k-token
KV: that part grows with the rows), ~48 ms matmuls (weights streamed once per step, whatever the
rows) and ~12 ms the rest; a prefill costs ~0.65 s, ~20% of the wall time of 8 concurrent answers.

Memory: the buffers hold ``rows x capacity x per-token KV bytes`` (capacity: the longest prompt
plus its ``max_new_tokens`` with 1/8 headroom; rows allocated for the requests in sight, else by
doubling, up to ``max_batch``); a prefilled request joins only while that stays within
``EngineConfig.batch_kv_bytes``, else it waits for a request to leave (a request alone always
runs). Buffers are freed when the batch empties.
"""
from __future__ import annotations

import atexit
import collections
import queue
import threading
import weakref
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import torch

from kvboost_rag.errors import GenerationCancelled, KVBoostError, SchedulerFullError
from kvboost_rag.decode.loop import GenerationResult, SamplingParams, decode
from kvboost_rag.kv.hf_compat import cache_kwargs

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
    not expanded. Without ``kvboost_rows`` (another caller while the implementation is switched)
    or with several queries it is transformers' own SDPA path with the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kvboost_rows is None or query.shape[2] != 1 or len(kvboost_rows) != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and not _gqa_without_mask(key, value)) or any(
            kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks")):
        # anything unusual: run transformers' path itself, row by row, as a request alone calls it
        outs = []
        for b, n in enumerate(kvboost_rows):
            row_kwargs = dict(kwargs)
            bias = kwargs.get("position_bias")
            if isinstance(bias, torch.Tensor):
                row_kwargs["position_bias"] = bias[b:b + 1 if bias.shape[0] > 1 else 1, ..., :n]
            outs.append(sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, :n], value[b:b + 1, :, :n],
                                               None, dropout=dropout, scaling=scaling, **row_kwargs)[0])
        return torch.cat(outs), None
    # What sdpa_attention_forward runs for one query without a mask (is_causal False, grouped heads
    # through enable_gqa), minus its per-call Python: this path runs rows x layers times a step.
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = {"enable_gqa": True} if groups > 1 else {}
    outs = [sdpa(query[b:b + 1], key[b:b + 1, :, :n], value[b:b + 1, :, :n], attn_mask=None,
                 dropout_p=dropout, scale=scaling, is_causal=False, **gqa)
            for b, n in enumerate(kvboost_rows)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)   # a lone row: no copy
    return out.transpose(1, 2).contiguous(), None


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
    the mask of :meth:`step_inputs` hides, row by row, the slots past its own length, and
    :meth:`valid_lengths` tells the ragged attention path how many keys each row has.

    Growth is amortized: rows are allocated for the demand the scheduler expects (``want_slots``)
    or by doubling, capacity with 1/8 headroom in steps of 256 tokens, so a burst of requests of
    similar lengths reallocates rarely. ``zero_fill=False`` (the ragged path, which never reads
    past a row's length) skips clearing new buffers."""

    def __init__(self, zero_fill: bool = True) -> None:
        self.zero_fill = zero_fill
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
            # zeros for the masked path: a masked slot still enters the product (0 x NaN garbage = NaN)
            alloc = torch.zeros if self.zero_fill else torch.empty
            nk = alloc((slots, k.shape[-3], capacity, k.shape[-1]), dtype=k.dtype, device=k.device)
            nv = alloc((slots, v.shape[-3], capacity, v.shape[-1]), dtype=v.dtype, device=v.device)
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

    def capacity_for(self, need: int) -> int:
        """The capacity the buffers have once a row needing ``need`` tokens joins."""
        if need <= self.capacity:
            return self.capacity
        return max(self.capacity, -(-(need + need // 8) // 256) * 256)

    def slots_for(self, max_slots: int, want_slots: int = 0) -> int:
        """The rows the buffers have once one more row joins."""
        if self.size < self.slots:
            return self.slots
        return max(self.size + 1, min(max_slots, max(2 * self.slots, want_slots, 1)))

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], need: int, max_slots: int,
            want_slots: int = 0) -> int:
        """Copy one prompt's per-layer ``[1, heads, n, d]`` K/V into a new row with room for
        ``need`` tokens in all; return the row index. When the buffers must grow they get
        ``want_slots`` rows (the demand the caller expects; else twice as many), at most
        ``max_slots``."""
        n = keys[0].shape[-2]
        if self.size >= self.slots or need > self.capacity:
            slots = self.slots_for(max_slots, want_slots)
            if slots == self.slots:  # growing for capacity: take the expected rows too
                slots = max(slots, min(max_slots, want_slots))
            self._reallocate(slots, self.capacity_for(need), keys if not self.keys else self.keys,
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
        if b == 1:
            self._mask[0, self.lengths[0]] = 0  # this step's own token
        else:
            self._mask[self._rows, lengths] = 0
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
        b = self.size
        if b == 1:  # a lone row: a slice copy, as the in-place cache of a request alone does
            n = self.lengths[0]
            k[0, :, n:n + 1].copy_(key_states[0])
            v[0, :, n:n + 1].copy_(value_states[0])
        else:
            k[self._rows, :, self._write, :] = key_states[:, :, 0, :]
            v[self._rows, :, self._write, :] = value_states[:, :, 0, :]
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
        _set_attn(config, RAGGED_ATTENTION)  # restored below; other callers fall back to SDPA
        extra["kvboost_rows"] = kv.valid_lengths()
    try:
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, **cache_kwargs(kv),
                    use_cache=True, **extra)
    finally:
        if extra:
            _set_attn(config, previous)
    kv.advance()
    return out


def _event(kind: str, item: Any) -> tuple:
    """A request's queued event as the engine's stream item: ``(delta, None)`` for text,
    ``("", result)`` once done; an error is raised in the consumer's thread."""
    if kind == "delta":
        return item, None
    if kind == "done":
        return "", item
    raise item


def _set_attn(config, name: str) -> None:
    """Switch a config's attention implementation (the plain attribute where the config has no
    sub-configs: the property's setter walks them, ~7 us a call)."""
    if not getattr(config, "sub_configs", None) and hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name


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


_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _shutdown_schedulers() -> None:
    """At interpreter exit, stop every worker thread and wait for it: a daemon thread that has run
    torch and is still alive while the interpreter finalizes can abort the process ("terminate
    called without an active exception", exit code 134), e.g. right after ``generate_batch``."""
    for sched in list(_LIVE):
        sched.close()


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
        # Batched steps of SDPA models attend row by row over each row's own keys (see
        # _ragged_attention): the same float results as each request alone, and no padding read.
        self.ragged = _register_ragged()
        self.kv = self._new_kv()
        self._worker: Optional[threading.Thread] = None
        self._inline: Optional[Request] = None   # a lone request whose caller's thread drives the loop
        self._drive = threading.Lock()            # held by whichever thread runs a scheduler round
        self._closing = False
        self._token_bytes = 0
        self.stats = collections.Counter()
        _LIVE.add(self)

    def _new_kv(self) -> BatchKV:
        # the ragged path never reads a row past its length: new buffers need no clearing
        return BatchKV(zero_fill=not (self.ragged and self.engine.model.config._attn_implementation == "sdpa"))

    # ------------------------------------------------------------------ caller side
    def _has_work(self) -> bool:
        return bool(self._waiting or self._ready or self._active)

    def submit(self, request: Request, inline: bool = False) -> bool:
        """Queue a request. With ``inline``, when the scheduler is idle (nothing queued or
        decoding), the caller's thread is to drive it (returns True): a lone
        request then runs without a thread hand-off per token, as fast as ``batching=False``. Any
        other submission ends that: the worker thread takes over the whole batch."""
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                self.stats["refused"] += 1
                raise SchedulerFullError(
                    f"{len(self._waiting)} requests are already waiting for this engine (max_waiting="
                    f"{self.max_waiting}); retry later, or raise max_waiting / max_batch in EngineConfig")
            worker_alive = self._worker is not None and self._worker.is_alive()
            # an idle worker (waiting to exit) leaves a lone request to its caller, and exits
            drive_here = inline and self._inline is None and not self._has_work()
            self._waiting.append(request)
            if drive_here:
                self._inline = request
                return True
            self._inline = None  # a second request: the worker drives from now on
            self._closing = False
            if not worker_alive:
                self._worker = threading.Thread(target=self._loop, name="kvboost-scheduler", daemon=True)
                self._worker.start()
            self._cv.notify_all()
            return False

    def run(self, prompt, params: SamplingParams, strategy, ratio,
            should_stop: Optional[Callable[[], bool]] = None) -> Iterator[tuple[str, Optional[GenerationResult]]]:
        """The same events as ``KVBoostEngine._run`` (text deltas, then ``("", result)``). A lone
        request is driven by the caller's own thread (between its yields) until another request
        arrives; otherwise, or from then on, the worker thread produces them and this thread only
        waits on its queue."""
        req = Request(prompt, params, strategy, ratio, should_stop)
        inline = self.submit(req, inline=True)
        try:
            if inline:
                try:
                    while self._inline is req:
                        self._iterate()
                        while True:
                            try:
                                kind, item = req.events.get_nowait()
                            except queue.Empty:
                                break
                            yield _event(kind, item)
                            if kind == "done":
                                return
                finally:
                    self._end_inline(req)
            while True:
                try:
                    kind, item = req.events.get(timeout=_POLL_S)
                except queue.Empty:
                    if req.stopped():
                        raise GenerationCancelled("stopped while waiting for the batch") from None
                    continue
                yield _event(kind, item)
                if kind == "done":
                    return
        finally:
            req.abandoned = True  # the worker drops it at its next step (or before its prefill)

    def _end_inline(self, req: Request) -> None:
        """The inline driver stops (its answer is done, failed or dropped): what is left goes to
        the worker thread."""
        with self._cv:
            if self._inline is req:
                self._inline = None
            if self._has_work() and not (self._worker is not None and self._worker.is_alive()):
                self._worker = threading.Thread(target=self._loop, name="kvboost-scheduler", daemon=True)
                self._worker.start()
            self._cv.notify_all()

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._closing or not self._has_work() or self._inline is not None:
                    if self._closing or (not self._cv.wait(_IDLE_EXIT_S)
                                         and (not self._has_work() or self._inline is not None)):
                        if self._worker is threading.current_thread():
                            self._worker = None  # idle (or a caller drives its lone request): exit
                        return
            self._iterate()

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Stop the worker thread after its current round and wait up to ``timeout`` s for it
        (called at interpreter exit; a later request starts a new worker)."""
        with self._cv:
            self._closing = True
            worker = self._worker
            self._cv.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _iterate(self) -> None:
        """One round: at most one prefill (waiting prompts never starve the answers being decoded,
        nor the reverse), the joins it allows, one decode step for every active request."""
        with self._drive:
            with self._cv:
                nxt = None
                if not self._ready and self._waiting and len(self._active) < self.max_batch:
                    nxt = self._waiting.popleft()
            try:
                t0 = time.perf_counter()
                if nxt is not None:
                    self._prefill(nxt)
                t1 = time.perf_counter()
                self._admit_ready()
                t2 = time.perf_counter()
                if self._active:
                    self._step()
                t3 = time.perf_counter()
                self.stats["prefill_s"] += t1 - t0   # prefills/blends and first tokens
                self.stats["join_s"] += t2 - t1      # moving prompts' KV into the batch
                self.stats["step_s"] += t3 - t2      # decode steps (forward + each row's sampling)
            except BaseException as exc:  # noqa: BLE001 - handed to every request concerned
                self._fail_all(exc)

    def _deliver_error(self, req: Request, exc: BaseException) -> None:
        req.events.put(("error", exc))

    def _fail_all(self, exc: BaseException) -> None:
        for req in list(self._active) + list(self._ready):
            self._deliver_error(req, exc)
        self._active.clear()
        self._ready.clear()
        self.kv = self._new_kv()

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
            capacity = self.kv.capacity_for(req.need)
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
            with self._cv:  # rows for every request in sight, so a burst does not regrow the buffers
                demand = len(self._active) + 1 + len(self._ready) + len(self._waiting)
            self.kv.add([l.keys for l in layers], [l.values for l in layers], req.need, limit, want_slots=demand)
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
        t0 = time.perf_counter()
        with engine._lock, torch.inference_mode():
            ids = torch.tensor([[r.token] for r in self._active], device=device)
            out = batched_step(engine.model, self.kv, ids, ragged=self.ragged)
        self.stats["forward_s"] += time.perf_counter() - t0
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
        """Counters (requests, steps, row-steps, the worker's seconds in prefills, joins, steps and
        the forwards within them) and the current state (waiting, active, reserved KV bytes)."""
        with self._cv:
            return {**self.stats, "waiting": len(self._waiting), "ready": len(self._ready),
                    "active": len(self._active), "reserved_kv_bytes": self._reserved_bytes()}


__all__ = ["Scheduler", "BatchKV", "Request", "batched_step", "supports", "SchedulerFullError", "KVBoostError"]
