"""What a blend recomputes: the fixed, per-engine settings (per-request state is in
:class:`kvboost_rag.blend.attention.BlendMetadata`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..defaults import DEFAULT_RECOMPUTE_RATIO
from ..errors import InvalidConfigError


@dataclass(frozen=True)
class BlendConfig:
    """How much to recompute and how to choose it.

    recompute_ratio: share of reused tokens recomputed through every layer (0..1).
    selection: the rule that ranks reused tokens, a name in
        :data:`kvboost_rag.blend.selection.SELECTION_RULES`. ``"attention"`` (default): the
        question runs alone over the reused KV and ranks tokens by the attention it pays them.
        ``"value"`` / ``"key"``: deviation of their V / K at the check layer (CacheBlend's rule).
    check_layer: layer at which the deviation rules measure (layers before it run for all tokens).
    sink_tokens: first tokens of each reused document always recomputed (they were attention
        sinks when the document was encoded alone).
    block_size: query block size of the masked attention over scattered tokens (128 measured
        3-4% lower TTFT than 64 or 192 on the benchmark's 8-document prompts).
    reused_key_scale: factor on the keys of reused tokens that are not recomputed (an attention
        temperature of 1/scale on stale KV, APE-style; 1.0 = off). Recomputed tokens get fresh
        keys, so at ratio 1.0 the result is a full prefill's whatever the factor.
    """

    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    selection: str = "attention"
    check_layer: int = 1
    sink_tokens: int = 4
    block_size: int = 128
    reused_key_scale: float = 1.0

    def __post_init__(self) -> None:
        from .selection import SELECTION_RULES

        ratio = self.recompute_ratio
        if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
            raise InvalidConfigError(f"recompute_ratio must be a number within [0, 1], got {ratio!r}")
        if self.selection not in SELECTION_RULES:
            raise InvalidConfigError(f"selection must be one of {sorted(SELECTION_RULES)}, got {self.selection!r}")
        if not (isinstance(self.reused_key_scale, (int, float)) and self.reused_key_scale > 0):
            raise InvalidConfigError(f"reused_key_scale must be > 0, got {self.reused_key_scale!r}")
        if self.check_layer < 0 or self.sink_tokens < 0 or self.block_size < 1:
            raise InvalidConfigError("check_layer and sink_tokens must be >= 0, block_size >= 1")
