"""One generation request: what to generate, how, and what came of it.

The engine builds a :class:`GenerationRequest` once per call and checks every option there: the
prompt, its :class:`~kvboost_rag.decode.loop.SamplingParams`, the strategy and the
:class:`~kvboost_rag.config.BlendConfig` its prefill runs with (the engine's, with this call's
``recompute_ratio`` in it). From then on the request is the only thing that travels: the
in-thread path (:meth:`Runner.events`) and the batch scheduler (:mod:`.scheduler`) both hand it to
the engine's prefill function, record each decoded token on it and build its result from it.

Per-request options are defined once: the generation options are the fields of
:class:`SamplingParams` (a new one is one field there, accepted by ``generate`` / ``stream`` and
by the framework integrations with no other change); :data:`REQUEST_OPTIONS` are the request's
own (strategy, blend ratio, deadline). :data:`GENERATION_OPTIONS` is every name a call accepts.

The serve layer never imports the engine: what it needs from it (model, tokenizer, lock, the
prefill of a request, the result builder) comes as a :class:`Runner`. Design: docs/architecture.md.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from kvboost_rag import validate
from kvboost_rag.config import STRATEGIES, BlendConfig, EngineConfig
from kvboost_rag.decode.constraints import parse_constrained
from kvboost_rag.decode.loop import GenerationResult, SamplingParams, decode
from kvboost_rag.errors import InvalidConfigError, InvalidInputError
from kvboost_rag.prefill.forward import Prefill
from kvboost_rag.prompt.segments import Prompt, check_prompt

__all__ = ["GenerationRequest", "Runner", "SAMPLING_OPTIONS", "REQUEST_OPTIONS", "GENERATION_OPTIONS",
           "sampling_params", "checked_request", "build_result"]

#: The generation options: the fields of :class:`SamplingParams`, in their order.
SAMPLING_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
#: Options of the request itself: ``strategy`` and ``recompute_ratio`` (its :class:`BlendConfig`),
#: ``timeout`` (its deadline, prefill included). ``None`` keeps the engine's default.
REQUEST_OPTIONS: tuple[str, ...] = ("strategy", "recompute_ratio", "timeout")
#: Every option name ``generate`` / ``stream`` / ``generate_batch`` accept for one generation.
GENERATION_OPTIONS: frozenset = frozenset(SAMPLING_OPTIONS + REQUEST_OPTIONS)


def sampling_params(options: Mapping[str, Any], *, also: Iterable[str] = ()) -> SamplingParams:
    """:class:`SamplingParams` from keyword options. A name that is not one of its fields is an
    :class:`~kvboost_rag.errors.InvalidInputError` naming it and listing the accepted names
    (:data:`GENERATION_OPTIONS` plus ``also``, the caller's own keywords)."""
    unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
    if unknown:
        accepted = ", ".join(sorted(GENERATION_OPTIONS | set(also)))
        raise InvalidInputError(f"unexpected arguments: {unknown}; accepted: {accepted}")
    return SamplingParams(**options)


@dataclass(eq=False)
class GenerationRequest:
    """One generation, from the checked call to its result.

    Set by the engine when the call is checked: ``prompt``, ``params``, ``strategy``, ``blend``
    (the BlendConfig the prefill runs with; ``"reuse"`` has its recompute zeroed), ``timeout``.
    ``should_stop`` is the stream's: true once cancelled or past the deadline, polled by the
    prefill and the decode loop. The rest is filled as it runs: the prefill, the generated ids and
    text, the finish reason, the timings and the :class:`GenerationResult`."""

    prompt: Prompt
    params: SamplingParams
    strategy: str
    blend: BlendConfig
    timeout: Optional[float] = None
    should_stop: Optional[Callable[[], bool]] = None
    prefilled: Optional[Prefill] = None   # dropped once the result is built (it holds the KV cache)
    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str = "length"
    started: float = 0.0                  # time.perf_counter() when a runner took the request
    queue_s: Optional[float] = None       # waiting for the scheduler before the prefill (batched only)
    ttft_s: float = 0.0                   # up to the first token (as the result reports it)
    result: Optional[GenerationResult] = None

    def stopped(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def start(self) -> None:
        self.started = time.perf_counter()

    @property
    def kv_tokens(self) -> int:
        """KV tokens this request may hold: its prompt plus ``max_new_tokens`` (once prefilled)."""
        return len(self.prefilled.input_ids) + self.params.max_new_tokens

    def record(self, token: int, delta: str, reason: Optional[str]) -> None:
        """Note one step of the decode loop (:func:`~kvboost_rag.decode.loop.decode`'s tuple)."""
        if reason != "eos":
            self.token_ids.append(token)
        if delta:
            self.text_parts.append(delta)
        if reason is not None:
            self.finish_reason = reason

    def finish(self, result: GenerationResult) -> GenerationResult:
        """Keep the result and let go of the prompt's KV cache."""
        self.result, self.prefilled = result, None
        return result


def checked_request(prompt: Prompt, defaults: EngineConfig, options: Mapping[str, Any], *,
                    also: Iterable[str] = ()) -> GenerationRequest:
    """A call's arguments checked, once, into its request. ``options``: the call's keywords, the
    :data:`REQUEST_OPTIONS` (None: ``defaults``' strategy and BlendConfig) and SamplingParams fields
    (``also``: the caller's own keywords, named when one is unknown). ``recompute_ratio`` goes into
    the BlendConfig and is checked whatever the strategy; ``"reuse"`` recomputes nothing."""
    options = dict(options)
    strategy, ratio, timeout = (options.pop("strategy", None), options.pop("recompute_ratio", None),
                                options.pop("timeout", None))
    params = sampling_params(options, also=also)
    check_prompt(prompt)
    timeout = validate.timeout(timeout)
    strategy = strategy if strategy is not None else defaults.strategy
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise InvalidConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    blend = defaults.blend
    if ratio is not None:
        blend = dataclasses.replace(blend, recompute_ratio=validate.ratio("recompute_ratio", ratio))
    if strategy == "reuse":
        blend = dataclasses.replace(blend, recompute_ratio=0.0, sink_tokens=0)
    return GenerationRequest(prompt, params, strategy, blend, timeout=timeout)


def build_result(request: GenerationRequest, *, dtype: str) -> GenerationResult:
    """The :class:`GenerationResult` of a finished request (timed up to now). ``dtype``: the
    model's, reported in ``extra``. A constrained answer's parsed JSON is ``extra["json"]``."""
    total = time.perf_counter() - request.started
    ttft = request.ttft_s
    stats = request.prefilled.stats
    ids = request.token_ids
    text = "".join(request.text_parts)
    extra = {"documents": stats.documents, "documents_reused": stats.documents_reused, "dtype": dtype}
    if request.params.constraint is not None:
        extra["json"] = parse_constrained(text, request.params.constraint)
    return GenerationResult(
        text=text, token_ids=ids, finish_reason=request.finish_reason, prompt_tokens=stats.prompt_tokens,
        reused_tokens=stats.reused_tokens, recomputed_tokens=stats.recomputed_tokens, fresh_tokens=stats.fresh_tokens,
        completion_tokens=len(ids), ttft_s=ttft, total_s=total,
        tokens_per_s=len(ids) / max(total - ttft, 1e-9) if ids else 0.0, strategy=stats.strategy,
        recompute_ratio=stats.recompute_ratio, prefix_cached_tokens=stats.prefix_cached_tokens, extra=extra)


@dataclass
class Runner:
    """What running a request takes, handed down by the engine: the model and tokenizer it decodes
    with, the EOS ids, the lock held around every model call, ``prefill`` (a request -> its
    :class:`~kvboost_rag.prefill.forward.Prefill`, TTFT measured) and ``result`` (a finished
    request -> its :class:`GenerationResult`). One instance per engine, shared by the in-thread
    path and the scheduler, so a change the engine makes to it (``engine.eos_ids = ...``) reaches both."""

    model: Any
    tokenizer: Any
    eos_ids: set
    lock: Any
    prefill: Callable[[GenerationRequest], Prefill]
    result: Callable[[GenerationRequest], GenerationResult]

    def events(self, request: GenerationRequest) -> Iterator[tuple[str, Optional[GenerationResult]]]:
        """Run ``request`` in the calling thread: ``(delta, None)`` per text delta, then
        ``("", result)``. The lock is held per model call, never across a yield: a consumer may
        stop reading (or drop the stream in another thread) at any time."""
        request.start()
        pre = request.prefilled = self.prefill(request)
        request.ttft_s = pre.ttft_s
        for token, delta, reason in decode(self.model, self.tokenizer, pre.cache, pre.logits, len(pre.input_ids),
                                           request.params, self.eos_ids, step_lock=self.lock,
                                           should_stop=request.should_stop, prompt_ids=pre.input_ids):
            request.record(token, delta, reason)
            if delta:
                yield delta, None
        yield "", request.finish(self.result(request))
