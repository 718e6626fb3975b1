"""Prompts as the engine sees them: segments, document detection, chat rendering, tool templates (layer 1)."""
