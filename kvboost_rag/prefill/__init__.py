"""The prompt's KV: assembly of stored chunks, prefix cache, full and blended prefill, cancellation (layer 3)."""
