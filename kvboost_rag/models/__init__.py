"""Model loading, packaged models, fingerprints and per-architecture adapters (layer 1)."""
