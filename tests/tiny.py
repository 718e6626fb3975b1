"""Tiny random-weight models and an in-memory tokenizer for fast unit tests (no downloads)."""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Retrieval augmented generation reuses document caches. Question: what is the answer?",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~` \n\n\t",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_object() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    return tok


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer_object().__class__.from_str(_tokenizer_object().to_str()),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(kind: str = "llama", **overrides):
    """A 4-layer config of the given architecture (GQA: 4 query heads, 2 KV heads)."""
    import transformers

    vocab = 400
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  eos_token_id=2, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)  # q/k/v biases
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    elif kind == "phi3":
        cfg = transformers.Phi3Config(**common, sliding_window=None)
    elif kind == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=16)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(kind: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(kind, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    # Larger-than-default init makes attention patterns non-trivial, so mistakes show up.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model.eval()


def tiny_engine(kind: str = "llama", store=None, **kwargs):
    import warnings

    from kvboost_rag import KVBoostEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KVBoostEngine(tiny_model(kind), tiny_tokenizer(), store=store, **kwargs)


DOCS = [
    "Paris is the capital of France. It sits on the Seine and is known for the Eiffel tower.",
    "Berlin is the capital of Germany. The Brandenburg gate stands in the middle of the city.",
    "Rome is the capital of Italy. The Colosseum is an ancient amphitheatre in its centre.",
    "The quick brown fox jumps over the lazy dog while five dozen liquor jugs are packed.",
]
