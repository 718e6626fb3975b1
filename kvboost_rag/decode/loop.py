"""Decode an answer from a prepared KV cache: sampling, stop sequences, streaming, telemetry.

The first token's logits come from the prefill (full or blended); this module only runs the
decode loop, so both paths share it and differ only in how the prompt's KV was obtained.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from kvboost_rag.kv.decode_cache import with_room
from kvboost_rag import validate
from kvboost_rag.errors import GenerationCancelled, InvalidConfigError, StructuredOutputError
from kvboost_rag.kv.hf_compat import cache_kwargs
from kvboost_rag.decode.penalties import Penalties
from kvboost_rag.decode.constraints import Constraint, as_constraint


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when ``temperature == 0``; otherwise temperature / top-k / top-p sampling.

    Repetition controls (:mod:`~kvboost_rag.decode.penalties`): ``repetition_penalty`` (> 0, 1.0 = off),
    ``frequency_penalty`` / ``presence_penalty`` (within [-2, 2], 0 = off), ``no_repeat_ngram_size``
    (0 = off). ``constraint`` (:mod:`~kvboost_rag.decode.constraints`): the output must be JSON matching
    it; the grammar decides where the output ends, so a caller asking for ``stop`` as well is
    refused here. (Framework integrations, whose objects carry a default ``stop``, drop it when
    they derive a constraint themselves: :func:`kvboost_rag.frameworks.options.constrained_kwargs`.)

    These fields are the generation options, defined once: ``engine.generate`` / ``stream`` and
    the framework integrations accept exactly them (plus the request's own options,
    :data:`kvboost_rag.serve.request.REQUEST_OPTIONS`)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    constraint: Optional[Constraint] = None

    def __post_init__(self) -> None:
        # Checked and normalized here (validate.py): 3.0 -> 3, stop="abc" -> ("abc",); bools, NaN,
        # infinities and non-integral counts are refused with an InvalidConfigError.
        checked = {
            "max_new_tokens": validate.integer("max_new_tokens", self.max_new_tokens, minimum=1),
            "temperature": validate.real("temperature", self.temperature, minimum=0.0),
            "top_p": validate.real("top_p", self.top_p, minimum=0.0, maximum=1.0, exclusive_minimum=True),
            "top_k": validate.integer("top_k", self.top_k, minimum=0),
            "seed": validate.seed(self.seed),
            "stop": validate.stop_sequences(self.stop),
            "repetition_penalty": validate.real("repetition_penalty", self.repetition_penalty, minimum=0.0,
                                                exclusive_minimum=True),
            "frequency_penalty": validate.real("frequency_penalty", self.frequency_penalty, minimum=-2.0, maximum=2.0),
            "presence_penalty": validate.real("presence_penalty", self.presence_penalty, minimum=-2.0, maximum=2.0),
            "no_repeat_ngram_size": validate.integer("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0),
            "constraint": as_constraint(self.constraint),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.constraint is not None and self.stop:
            raise InvalidConfigError("stop sequences cannot be combined with a constraint: the grammar decides "
                                     "where the output ends (a stop string could cut the JSON)")


@dataclass
class GenerationResult:
    """An answer and what it cost. Token counts partition the prompt:
    ``prompt_tokens == reused_tokens + recomputed_tokens + fresh_tokens``."""

    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (stop sequence), "eos", or "length"
    prompt_tokens: int
    reused_tokens: int          # stored KV used as is
    recomputed_tokens: int      # stored KV recomputed by the blend
    fresh_tokens: int           # no stored KV: computed
    completion_tokens: int
    ttft_s: float               # segmenting + fetch + re-rotate + blend, up to the first token's logits
    total_s: float
    tokens_per_s: float
    strategy: str
    recompute_ratio: float
    prefix_cached_tokens: int = 0  # part of reused_tokens: the text before the first document, from the prefix cache
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def telemetry(self) -> dict:
        """The measurements of this answer (no text), as frameworks put them in their metadata."""
        return {k: v for k, v in self.to_dict().items() if k not in ("text", "token_ids", "extra")}


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """Pick the next token id from ``[vocab]`` logits."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = cum - probs > params.top_p  # keep the smallest set whose mass reaches top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the model's generation config, plus the tokenizer's EOS."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class TextAssembler:
    """Turns generated ids into text deltas, cutting at the first stop sequence.

    Text that could still be the beginning of a stop sequence (or an incomplete UTF-8
    character) is held back, so a stream never shows text that a stop would remove.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def _holdback(self, text: str) -> int:
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def add(self, token_id: int) -> str:
        """Add one id; return the newly final text."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.stopped = True
        else:
            self.text = text
        if self.stopped:
            safe = len(self.text)
        else:
            safe = len(text) - self._holdback(text)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


@torch.inference_mode()
def decode(model, tokenizer, cache, first_logits: torch.Tensor, start_position: int, params: SamplingParams,
           eos_ids: set[int], step_lock=None, should_stop=None,
           prompt_ids: Sequence[int] = ()) -> Iterator[tuple[int, str, Optional[str]]]:
    """Yield ``(token_id, text_delta, finish_reason_or_None)`` for each generated token.

    ``cache`` holds the prompt's KV (a transformers DynamicCache); it grows as we decode, in
    place (:func:`~kvboost_rag.kv.decode_cache.with_room`).
    The last tuple carries the finish reason and any held-back text. ``step_lock`` (if given)
    is held around each model call only, never while the caller consumes a token. ``should_stop``
    (if given) is checked before each model call; when true, :class:`GenerationCancelled` is raised.
    ``prompt_ids`` feed the penalties that look at the prompt (repetition, n-grams).

    Each step's logits (the first from the prefill) go through the penalties, then the
    constraint's mask, then sampling / greedy. Under a constraint the output ends with finish
    reason ``"stop"`` once the grammar is complete and only EOS could follow; running out of
    ``max_new_tokens`` before that raises :class:`StructuredOutputError`.
    """
    lock = step_lock if step_lock is not None else contextlib.nullcontext()
    device = first_logits.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    assembler = TextAssembler(tokenizer, params.stop)
    logits = first_logits
    position = start_position
    vocab = first_logits.shape[-1]
    state = params.constraint.start(tokenizer, vocab, eos_ids) if params.constraint is not None else None
    penalties = Penalties(params, prompt_ids, vocab, device)
    penalties = penalties if penalties.active else None
    for step in range(params.max_new_tokens):
        scores = penalties.apply(logits) if penalties is not None else logits
        if state is not None:
            masked = state.mask(scores)
            if penalties is not None and not bool(torch.isfinite(masked).any()):
                masked = state.mask(logits)  # the penalties banned every token the grammar allows
            scores = masked
        token = sample_token(scores, params, generator)
        if token in eos_ids:
            yield token, assembler.flush(), "eos"
            return
        if state is not None:
            state.advance(token)
        if penalties is not None:
            penalties.update(token)
        delta = assembler.add(token)
        if assembler.stopped:
            yield token, delta + assembler.flush(), "stop"
            return
        if state is not None and state.finished(eos_ids):
            yield token, delta + assembler.flush(), "stop"
            return
        if step == params.max_new_tokens - 1:
            if state is not None and not state.complete:
                tail = assembler.text[-160:]
                raise StructuredOutputError(
                    f"max_new_tokens={params.max_new_tokens} ran out before the output was complete "
                    f"(expected {state.description}); the answer so far ends with {tail!r}. Raise "
                    "max_new_tokens, or bound the schema (maxLength on strings, maxItems on arrays); a "
                    "model repeating itself inside a string needs a repetition_penalty (e.g. 1.3)")
            yield token, delta + assembler.flush(), "length"
            return
        yield token, delta, None
        if step == 0:  # after the first token is out, so streaming users do not wait for the move
            cache = with_room(cache, params.max_new_tokens)  # in-place appends, not a copy per token
        if should_stop is not None and should_stop():
            raise GenerationCancelled(f"stopped after {step + 1} generated tokens")
        with lock, torch.inference_mode():
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                position_ids=torch.tensor([[position]], device=device),
                **cache_kwargs(cache),
                use_cache=True,
            )
        logits = out.logits[0, -1]
        position += 1


@torch.inference_mode()
def teacher_forced_logits(model, cache, first_logits: torch.Tensor, start_position: int, answer_ids: Sequence[int],
                          step_lock=None) -> torch.Tensor:
    """Logits at each answer position given the answer so far: ``[len(answer_ids), vocab]``,
    float32. Row 0 is ``first_logits`` (the prefill's); the rest come from one forward over
    ``answer_ids[:-1]`` at ``start_position`` onwards, which extends ``cache``."""
    rows = [first_logits.float().unsqueeze(0)]
    if len(answer_ids) > 1:
        device = model.get_input_embeddings().weight.device
        ids = torch.tensor([list(answer_ids[:-1])], device=device)
        pos = torch.arange(start_position, start_position + ids.shape[1], device=device).unsqueeze(0)
        with step_lock if step_lock is not None else contextlib.nullcontext():
            out = model(input_ids=ids, position_ids=pos, **cache_kwargs(cache), use_cache=True)
        rows.append(out.logits[0].float())
    return torch.cat(rows, dim=0)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so timings measure real completion."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()
