"""Serving: requests, the continuous-batching scheduler, streaming (layer 4)."""
