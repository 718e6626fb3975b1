"""What the LangChain and LlamaIndex integrations share: options, messages, telemetry, the lazy engine (layer 6)."""
