"""LlamaIndex integration of kvboost-rag (namespace package ``llama_index.llms.kvboost``).

* :class:`KVBoostLLM` - LLM over a local model with reused document KV.
* :class:`KVBoostSynthesizer` - response synthesizer handing nodes over as document segments.
* :class:`KVBoostWarmer` - ingestion step warming nodes' KV (idempotent via the KV store).
* :class:`TelemetryRecorder` - collects TTFT / reused tokens from instrumentation events.
"""
from llama_index.llms.kvboost.base import KVBoostLLM, message_to_engine, telemetry
from llama_index.llms.kvboost.ingestion import KVBoostWarmer
from llama_index.llms.kvboost.synthesizer import KVBoostSynthesizer
from llama_index.llms.kvboost.telemetry import TelemetryRecorder

__all__ = ["KVBoostLLM", "KVBoostSynthesizer", "KVBoostWarmer", "TelemetryRecorder", "message_to_engine", "telemetry"]
