"""Tiny random-weight models, in-memory tokenizers and a ChatML template for fast tests (no downloads).

The one copy shared by the core tests, the benchmark tests and the integration distributions'
tests (whose engines and fixtures are in :mod:`kvboost_rag.testing.integration`).
Everything is built in memory in about a second: the answers are gibberish, but the plumbing,
positions, shapes and reuse counters are real.

* :data:`CHAT_TEMPLATE`: ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``), the one template
  of both tokenizers.
* :func:`tiny_tokenizer`: a byte-level BPE trained in memory on :data:`TRAINING_TEXT` (400 ids:
  ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2; eos ``<|im_end|>``, pad
  ``<|endoftext|>``). Same vocabulary in every process.
* :func:`word_tokenizer`: one id per whitespace word ``w0 .. wN`` (plus chat specials and a few
  prompt words), so ``n`` random words are exactly ``n`` ids: the benchmark's random-token corpus
  (:func:`kvboost_rag_bench.random_models.random_text`).
* :func:`tiny_config` / :func:`tiny_model` / :func:`tiny_engine`: a 4-layer GQA model (4 query
  heads, 2 KV heads) of the architectures the tests cover: llama, qwen2, qwen3, mistral, phi3, gemma.
* :data:`DOCS`: short documents, each longer than the engine's 64-character detection anchor.

Where the former copies differed, the parameters kept are those every test passes with: the
``tests/tiny.py`` tokenizer and model (4 layers, weights drawn from N(0, 0.08), larger than the
default init so attention patterns are non-trivial and mistakes show up, vocabulary 400, 1024
positions) and its capital-city :data:`DOCS`. The benchmark tests used a 2-layer default-init Llama
with a 512-word vocabulary: they now use ``tiny_engine(tokenizer=word_tokenizer(512))``, whose model
vocabulary follows the tokenizer's. The integration tests' 2-layer Llama with its own BPE is now
``tiny_engine(store=MemoryStore(), model_name="tiny-random-llama")``.

torch / transformers / tokenizers are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import functools

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 400

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Retrieval augmented generation reuses document caches. Question: what is the answer?",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~` \n\n\t",
]

DOCS = [
    "Paris is the capital of France. It sits on the Seine and is known for the Eiffel tower.",
    "Berlin is the capital of Germany. The Brandenburg gate stands in the middle of the city.",
    "Rome is the capital of Italy. The Colosseum is an ancient amphitheatre in its centre.",
    "The quick brown fox jumps over the lazy dog while five dozen liquor jugs are packed.",
]


# ------------------------------------------------------------------------------ tokenizers
@functools.lru_cache(maxsize=None)
def _bpe_json() -> str:
    """The trained byte-level BPE, serialized (trained once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True):
    """A fresh byte-level BPE tokenizer (see the module docstring)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json()),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


_WORD_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
_PROMPT_WORDS = ["Documents:", "Question:", "system", "user", "assistant"]


def word_tokenizer(vocab_size: int = 1024):
    """An in-memory whitespace word-level tokenizer (``w0 .. wN`` plus chat specials and a few
    prompt words) with the ChatML template; ``vocab_size`` ids in total. Offline, deterministic."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixed = _WORD_SPECIALS + _PROMPT_WORDS
    if vocab_size < len(fixed) + 16:
        raise ValueError(f"vocab_size {vocab_size} too small for the word tokenizer")
    vocab = {tok: i for i, tok in enumerate(fixed)}
    for i in range(vocab_size - len(fixed)):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------------------------- models
_ARCH_EXTRAS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": False}),  # q/k norms
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "phi3": ("Phi3Config", {"sliding_window": None}),  # fused qkv
    "gemma": ("GemmaConfig", {"head_dim": 16}),
}
ARCHITECTURES = tuple(_ARCH_EXTRAS)


def tiny_config(kind: str = "llama", **overrides):
    """A 4-layer config of the given architecture (GQA: 4 query heads, 2 KV heads, vocabulary 400)."""
    import transformers

    if kind not in _ARCH_EXTRAS:
        raise ValueError(f"unknown tiny architecture {kind!r}; one of {', '.join(ARCHITECTURES)}")
    cls, extras = _ARCH_EXTRAS[kind]
    cfg = getattr(transformers, cls)(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=2, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False, **extras)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(kind: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides):
    """A float32 model of :func:`tiny_config`, its matrices drawn from N(0, 0.08) with ``seed``."""
    import torch
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


def tiny_engine(kind: str = "llama", store=None, *, tokenizer=None, seed: int = 0, **kwargs):
    """A :class:`~kvboost_rag.KVBoostEngine` over :func:`tiny_model` and ``tokenizer`` (default
    :func:`tiny_tokenizer`; the model's vocabulary follows the tokenizer's size). ``kwargs`` go to
    the engine (``model_name``, ``recompute_ratio``...)."""
    import warnings

    from kvboost_rag import KVBoostEngine

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(kind, seed=seed, vocab_size=len(tokenizer))
        return KVBoostEngine(model, tokenizer, store=store, **kwargs)


# A Hermes-style chat template with tool support, the shape of Qwen2.5's: tools in the system turn, calls in <tool_call> tags, tool
# results in <tool_response> tags.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
