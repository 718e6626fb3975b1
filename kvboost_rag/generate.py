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

from .decode_cache import with_room
from .errors import InvalidConfigError


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when ``temperature == 0``; otherwise temperature / top-k / top-p sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidConfigError(f"top_k must be >= 0, got {self.top_k}")


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
           eos_ids: set[int], step_lock=None) -> Iterator[tuple[int, str, Optional[str]]]:
    """Yield ``(token_id, text_delta, finish_reason_or_None)`` for each generated token.

    ``cache`` holds the prompt's KV (a transformers DynamicCache); it grows as we decode, in
    place (:func:`~kvboost_rag.decode_cache.with_room`).
    The last tuple carries the finish reason and any held-back text. ``step_lock`` (if given)
    is held around each model call only, never while the caller consumes a token.
    """
    lock = step_lock if step_lock is not None else contextlib.nullcontext()
    device = first_logits.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    assembler = TextAssembler(tokenizer, params.stop)
    logits = first_logits
    position = start_position
    for step in range(params.max_new_tokens):
        token = sample_token(logits, params, generator)
        if token in eos_ids:
            yield token, assembler.flush(), "eos"
            return
        delta = assembler.add(token)
        if assembler.stopped:
            yield token, delta + assembler.flush(), "stop"
            return
        if step == params.max_new_tokens - 1:
            yield token, delta + assembler.flush(), "length"
            return
        yield token, delta, None
        if step == 0:  # after the first token is out, so streaming users do not wait for the move
            cache = with_room(cache, params.max_new_tokens)  # in-place appends, not a copy per token
        with lock, torch.inference_mode():
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                position_ids=torch.tensor([[position]], device=device),
                past_key_values=cache,
                use_cache=True,
            )
        logits = out.logits[0, -1]
        position += 1


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so timings measure real completion."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()
