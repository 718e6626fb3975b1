"""KV stores (layer 2): the store interface and in-memory tier, the disk store, the tiered store and
the store watcher. ``from kvboost_rag.store import MemoryStore`` keeps working as before."""
from kvboost_rag.store.memory import KVStore, MemoryStore

__all__ = ["KVStore", "MemoryStore"]
