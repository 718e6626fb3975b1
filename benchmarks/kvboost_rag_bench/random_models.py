"""Randomly initialized models of public shapes, and random-token text: speed without weights.

``kvboost-rag bench --random-weights CONFIG`` measures TTFT only, on machines where no weights can
be downloaded: the model has the layer count, widths, head layout, vocabulary and RoPE settings of
a public config (:data:`RANDOM_CONFIGS`, or any ``config.json``) and random weights, so its
answers mean nothing but every matrix product costs what the real one does. The corpus is random
words of :func:`kvboost_rag.testing.models.word_tokenizer`, one token each, so a document of
``n`` words is exactly ``n`` tokens.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

# Shapes of public configs (weights are random: speed only).
RANDOM_CONFIGS: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=4096),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=130000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, use_sliding_window=False),
}

# The word tokenizer of a random model is capped at this many ids (its embedding matrix is
# the config's; ids beyond the tokenizer are simply never used).
MAX_WORD_VOCAB = 32000


def word_count(tokenizer) -> int:
    """How many ``wN`` words :func:`kvboost_rag.testing.models.word_tokenizer` produced."""
    return sum(1 for t in tokenizer.get_vocab() if re.fullmatch(r"w\d+", t))


def random_text(rng: random.Random, n_tokens: int, n_words: int) -> str:
    """``n_tokens`` random words: exactly ``n_tokens`` ids with the word tokenizer."""
    return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n_tokens))


def load_random_config(spec: str):
    """A transformers config from a built-in name (:data:`RANDOM_CONFIGS`) or a JSON file."""
    from transformers import AutoConfig

    if spec in RANDOM_CONFIGS:
        raw = dict(RANDOM_CONFIGS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--random-weights: {spec!r} is neither a built-in config "
                             f"({', '.join(RANDOM_CONFIGS)}) nor a JSON file")
        raw = json.loads(path.read_text())
    raw = dict(raw)
    model_type = raw.pop("model_type", "llama")
    for k in ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
              "quantization_config", "auto_map"):
        raw.pop(k, None)
    return AutoConfig.for_model(model_type, **raw)


def build_random_model(config, *, device: str = "cpu", dtype=None, seed: int = 0):
    """A randomly initialized causal LM of ``config`` built directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def resolve_device(device: str) -> str:
    """``auto`` (or ``None``) -> ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
