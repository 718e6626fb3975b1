"""Named phases of a prefill, for profilers: ``with phase("probe"): ...``.

Each is a :func:`torch.profiler.record_function` range named ``kvboost.<name>``: free unless a
profiler is recording (``kvboost-rag bench --profile`` reads them to split a blend's time into
fetch, re-rotation and assembly, question probe, selected-token layers and attention).
"""
from __future__ import annotations

import torch

PREFIX = "kvboost."
PHASES = ("fetch", "assemble", "probe", "selected_layers", "attention", "logits")


def phase(name: str) -> torch.profiler.record_function:
    """The profiler range of one phase (a name in :data:`PHASES`)."""
    return torch.profiler.record_function(PREFIX + name)
