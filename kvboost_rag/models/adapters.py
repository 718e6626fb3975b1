"""Model-family adapters: everything kvboost-rag assumes about a model's module layout, in one place.

The blend does not call a model's ``forward``: it runs chosen tokens through one decoder layer at
a time over a blended K/V buffer, and re-rotates stored keys with the model's own RoPE
frequencies. Both need to know how a family lays out its modules. An adapter says exactly that,
and nothing else:

* ``project_qkv``: queries, keys and values of a layer's input, before RoPE (this is where
  families differ: separate or fused projections, per-head q/k norms);
* where the embedding, decoder layers, final norm, LM head and rotary module live;
* the rotary layout (Hugging Face "rotate_half": channel ``i`` pairs with ``i + rotary_dim/2``)
  and the inverse frequencies that :mod:`kvboost_rag.kv.rope` composes rotations with.

The rest of a layer (norms, RoPE via the family's own ``apply_rotary_pos_emb``, output projection,
MLP, residuals) is the same pre-norm decoder for every family here, and is run by calling the
model's own submodules, so its math is the model's. Running layers this way needs no change to
the shared model object: no attention implementation is switched, nothing is registered, so
several engines (and plain ``model.generate`` calls) can share one model from several threads.

Adding a family is one ``project_qkv`` function and one :data:`ADAPTERS` entry, plus the family in
the test matrix (``kvboost_rag.testing.models.tiny_config``), whose ratio-1.0 test proves the
adapter reproduces a full prefill.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from kvboost_rag.errors import UnsupportedModelError

# q, k, v as [1, heads, tokens, head_dim] from a normed hidden state [1, tokens, hidden]
ProjectQKV = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[1, tokens, heads * head_dim] -> [1, heads, tokens, head_dim]"""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def separate_qkv(attn, h):
    """Llama, Mistral, Qwen2 (q/k/v biases), Gemma: three projections."""
    return (_heads(attn.q_proj(h), attn.head_dim), _heads(attn.k_proj(h), attn.head_dim),
            _heads(attn.v_proj(h), attn.head_dim))


def separate_qkv_with_norms(attn, h):
    """Qwen3: three projections, then an RMS norm per query and key head (before RoPE)."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
    return q, k, _heads(attn.v_proj(h), attn.head_dim)


def fused_qkv(attn, h):
    """Phi-3: one ``qkv_proj`` whose output is [queries | keys | values]."""
    qkv = attn.qkv_proj(h)
    q_width = attn.config.num_attention_heads * attn.head_dim
    kv_width = attn.num_key_value_heads * attn.head_dim
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    return _heads(q, attn.head_dim), _heads(k, attn.head_dim), _heads(v, attn.head_dim)


@dataclass(frozen=True)
class ModelAdapter:
    """How kvboost-rag drives one family of pre-norm RoPE decoders (see the module docstring)."""

    family: str
    project_qkv: ProjectQKV
    tested: bool = True

    # ---------------------------------------------------------------- where things live
    @staticmethod
    def base(model) -> torch.nn.Module:
        return model.model

    def layers(self, model):
        return self.base(model).layers

    def embed(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [N, hidden] of ``input_ids`` [N] (Gemma's scale is inside its module)."""
        return self.base(model).embed_tokens(input_ids.unsqueeze(0))[0]

    def rotary_cos_sin(self, model, hidden: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, rotary_dim] for positions 0..N-1, from the model's own rotary module."""
        positions = torch.arange(n, device=hidden.device).unsqueeze(0)
        cos, sin = self.base(model).rotary_emb(hidden.unsqueeze(0), positions)
        return cos[0], sin[0]

    def inv_freq(self, model) -> torch.Tensor:
        """The rotary inverse frequencies (with linear/llama3/YaRN scaling already applied)."""
        inv = getattr(getattr(self.base(model), "rotary_emb", None), "inv_freq", None)
        if inv is None:
            raise UnsupportedModelError(f"{type(model).__name__} exposes no rotary inv_freq to re-rotate keys with")
        return inv

    def logits(self, model, last_hidden: torch.Tensor) -> torch.Tensor:
        """First-answer-token logits [vocab] (float32) from the last token's final hidden state."""
        h = self.base(model).norm(last_hidden.view(1, 1, -1))
        return model.lm_head(h)[0, -1].float()

    # ---------------------------------------------------------------- one layer
    def layer_forward(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run tokens through one decoder layer. hidden: [S, hidden]; cos/sin: [S, rotary_dim] at the
        tokens' positions. ``attend(q, k, v)`` ([1, heads, S, d] after RoPE) stores k/v wherever the
        caller keeps the sequence's K/V and returns the attention output [1, heads, S, d]."""
        attn = layer.self_attn
        x = hidden.unsqueeze(0)
        q, k, v = self.project_qkv(attn, layer.input_layernorm(x))
        q, k = _apply_rotary(attn)(q, k, cos.unsqueeze(0), sin.unsqueeze(0))
        out = attend(q, k, v)                                   # [1, heads, S, d]
        x = x + attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x[0]

    def project_values(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        """V [kv_heads, S, d] of ``hidden`` [S, hidden] at this layer, without attention or MLP."""
        _, _, v = self.project_qkv(layer.self_attn, layer.input_layernorm(hidden.unsqueeze(0)))
        return v[0]

    def scaling(self, layer) -> float:
        return float(layer.self_attn.scaling)


def _apply_rotary(attn) -> Callable:
    """The family's own ``apply_rotary_pos_emb`` (from the module that defines its attention): it
    knows the family's layout, partial rotary included."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(attn).__name__}'s module defines no apply_rotary_pos_emb")
    return fn


LLAMA = ModelAdapter("llama", separate_qkv)
QWEN3 = ModelAdapter("qwen3", separate_qkv_with_norms)
PHI3 = ModelAdapter("phi3", fused_qkv)

# model_type -> adapter. Every entry is in the test matrix (ratio 1.0 equals a full prefill).
ADAPTERS: dict[str, ModelAdapter] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gemma": LLAMA,
    "qwen3": QWEN3,
    "phi3": PHI3,
}
TESTED_MODEL_TYPES = frozenset(ADAPTERS)

_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")


def adapter_for(model, *, warn_untested: bool = True) -> ModelAdapter:
    """The adapter of ``model``'s family, after checking the module layout it relies on.

    A model type without an adapter whose modules have the Llama layout is driven by the Llama
    adapter, with a warning to check fidelity (``engine.verify``); anything else is refused."""
    base = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if base is None or not hasattr(base, a)]
    if missing or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{type(model).__name__} lacks the decoder layout kvboost-rag drives "
            f"(model.model.{{embed_tokens,layers,norm,rotary_emb}} and lm_head); missing: {missing or ['lm_head']}")
    model_type = getattr(model.config, "model_type", "unknown")
    adapter = ADAPTERS.get(model_type)
    layer = base.layers[0]
    if adapter is None:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise UnsupportedModelError(
                f"model type '{model_type}' has no kvboost-rag adapter and not the Llama attention layout "
                "(q_proj/k_proj/v_proj/o_proj); add one in kvboost_rag/models/adapters.py")
        adapter = ModelAdapter(model_type, separate_qkv, tested=False)
        if warn_untested:
            warnings.warn(
                f"kvboost-rag has not been tested on model type '{model_type}'. Check fidelity on your own "
                "prompts with engine.verify(prompts) (top-1 agreement and KL against a full prefill) "
                "before relying on it.", stacklevel=3)
    absent = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
    if absent:
        raise UnsupportedModelError(f"{type(layer).__name__} lacks {absent}, which the {adapter.family} adapter runs")
    _apply_rotary(layer.self_attn)
    return adapter
