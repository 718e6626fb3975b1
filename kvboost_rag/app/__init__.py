"""Applications over the engine: the CLI, warm_corpus and its Ray backend (layer 6)."""
