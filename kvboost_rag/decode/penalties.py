"""Repetition controls applied to the logits in the decode loop, before sampling or greedy.

Small models on long RAG prompts tend to loop; these are the usual remedies, with the semantics
users already know, so a value copied from another stack means the same here:

* ``repetition_penalty`` (Hugging Face / CTRL): every token already in the prompt or the answer has
  its logit divided by the penalty when positive, multiplied when negative. 1.0 = off.
* ``frequency_penalty`` / ``presence_penalty`` (OpenAI): subtract ``frequency * count + presence``
  from the logit of each token generated so far (answer tokens only). 0.0 = off.
* ``no_repeat_ngram_size`` (Hugging Face): a token that would repeat an n-gram already in the
  prompt or the answer is forbidden. 0 = off.

State is kept incrementally (a seen mask, a count vector, an n-gram table), so each step costs
O(vocab), not O(sequence).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


class Penalties:
    """Per-answer penalty state; ``apply`` before picking a token, ``update`` after."""

    def __init__(self, params, prompt_ids: Sequence[int], vocab_size: int, device) -> None:
        self.rep = params.repetition_penalty
        self.freq = params.frequency_penalty
        self.pres = params.presence_penalty
        self.n = params.no_repeat_ngram_size
        self.history = list(prompt_ids) if self.n else []
        self.seen = self.counts = None
        if self.rep != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in prompt_ids if 0 <= t < vocab_size], dtype=torch.long, device=device)
            self.seen[ids] = True
        if self.freq or self.pres:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.ngrams: dict[tuple, set[int]] = defaultdict(set)
        for i in range(len(self.history) - self.n + 1 if self.n else 0):
            self.ngrams[tuple(self.history[i:i + self.n - 1])].add(self.history[i + self.n - 1])

    @property
    def active(self) -> bool:
        return self.seen is not None or self.counts is not None or bool(self.n)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalized float copy of ``[vocab]`` logits (the input is not modified)."""
        logits = logits.float().clone()
        if self.seen is not None:
            hit = logits[self.seen]
            logits[self.seen] = torch.where(hit > 0, hit / self.rep, hit * self.rep)
        if self.counts is not None:
            logits -= self.freq * self.counts + self.pres * (self.counts > 0).float()
        if self.n:
            key = tuple(self.history[len(self.history) - self.n + 1:]) if self.n > 1 else ()
            banned = [t for t in self.ngrams.get(key, ()) if t < logits.numel()]
            if banned:
                logits[banned] = float("-inf")
        return logits

    def update(self, token: int) -> None:
        if self.seen is not None and token < self.seen.numel():
            self.seen[token] = True
        if self.counts is not None and token < self.counts.numel():
            self.counts[token] += 1
        if self.n:
            self.history.append(token)
            if len(self.history) >= self.n:
                self.ngrams[tuple(self.history[-self.n:-1])].add(token)
