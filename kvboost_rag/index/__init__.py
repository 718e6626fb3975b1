"""Index time: document sources, the encoder, the indexing job and the write-behind worker (layer 3)."""
