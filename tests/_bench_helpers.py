"""A tiny random-weight Llama and an in-memory word tokenizer for fast benchmark tests."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvboost_rag.bench import make_word_tokenizer

VOCAB = 512


def tiny_model(seed: int = 0, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer(vocab_size: int = VOCAB):
    return make_word_tokenizer(vocab_size)


def tiny_engine(seed: int = 0, **kwargs):
    from kvboost_rag import KVBoostEngine

    return KVBoostEngine(tiny_model(seed), tiny_tokenizer(), **kwargs)
