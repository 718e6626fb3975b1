"""LlamaIndex integration of kvboost-rag (namespace package ``llama_index.llms.kvboost``).

* :class:`KVBoostLLM` - LLM over a local model with reused document KV.
* :class:`KVBoostSynthesizer` - response synthesizer handing nodes over as document segments.
* :class:`KVBoostWarmer` - ingestion step warming nodes' KV (idempotent via the KV store).
* :class:`TelemetryRecorder` - collects TTFT / reused tokens from instrumentation events (query
  engine responses carry them in ``response.metadata["kvboost"]`` without it).
"""
from importlib import metadata

from llama_index.llms.kvboost.base import KVBoostLLM, message_to_engine, telemetry
from llama_index.llms.kvboost.ingestion import KVBoostWarmer
from llama_index.llms.kvboost.synthesizer import KVBoostSynthesizer
from llama_index.llms.kvboost.telemetry import TelemetryRecorder

try:
    __version__ = metadata.version("llama-index-llms-kvboost")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["KVBoostLLM", "KVBoostSynthesizer", "KVBoostWarmer", "TelemetryRecorder", "message_to_engine", "telemetry"]
