"""KV tensors and what is done to them: chunks, content keys, RoPE re-rotation, quantization, decode caches, Hugging Face cache compatibility (layer 1)."""
