"""``kvboost-rag`` CLI: help texts, inspect / verify exit codes, warm + ask on a tiny model folder."""
import json
import subprocess

import pytest

from kvboost_rag.index.context import ContextConfig
from kvboost_rag.testing.store import PYTHON, FakeEngine, make_docs, python_env
from kvboost_rag.app.cli import build_parser, main
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.app.warm import warm_corpus


def test_help_via_entry_point():
    out = subprocess.run([PYTHON, "-m", "kvboost_rag.app.cli", "--help"], env=python_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("warm", "inspect", "ask", "bench", "examples:", "KVBOOST_RAG_HOME"):
        assert word in out.stdout


@pytest.mark.parametrize("command", ["warm", "inspect", "ask"])
def test_subcommand_help_reads_well(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"kvboost-rag {command}" in text and "--store" in text


def test_bench_registered_through_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="kvboost_rag.commands")}
    assert eps.get("bench") == "kvboost_rag_bench.cli:add_parser"
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "bench" in sub.choices


def test_help_imports_no_torch():
    code = "import sys; from kvboost_rag.app.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], env=python_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_ask_help_states_the_engine_default_ratio(capsys):
    from kvboost_rag.blend import BlendConfig

    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    assert f"the engine's, {BlendConfig().recompute_ratio:g})" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["warm"])  # CORPUS missing
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["warm", "x.jsonl", "--kv-bits", "3"])
    assert info.value.code == 2


def test_inspect_and_verify_exit_codes(tmp_path, capsys):
    assert main(["inspect", "--store", str(tmp_path / "missing")]) == 1
    store = DiskStore(tmp_path)
    one_entry_each = ContextConfig(neighbour_kv="computed")  # one entry per document
    warm_corpus(make_docs(5), FakeEngine(store=store, fingerprint="model-X"), progress=False, context=one_entry_each)
    warm_corpus(make_docs(2, seed=9), FakeEngine(store=store, fingerprint="model-Y"), progress=False,
                context=one_entry_each)
    capsys.readouterr()
    assert main(["inspect", "--store", str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "entries    7" in out and "model-X: 5 entries" in out and "model-Y: 2 entries" in out
    assert "all entries intact" in out

    victim = sorted(tmp_path.rglob("*.safetensors"))[3]
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0x10
    victim.write_bytes(bytes(raw))
    key = victim.name[: -len(".safetensors")]
    assert main(["inspect", "--store", str(tmp_path)]) == 0  # no --verify: headers only
    assert main(["inspect", "--store", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT    1 entry" in out and key in out
    assert victim.exists(), "plain --verify only reports"
    assert main(["inspect", "--store", str(tmp_path), "--verify", "--repair", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert [c["key"] for c in summary["corrupt"]] == [key] and summary["entries"] == 7
    assert not victim.exists()
    assert main(["inspect", "--store", str(tmp_path), "--verify"]) == 0


def test_warm_then_ask_with_a_model_folder(tmp_path, tiny_model_dir, capsys):
    docs = make_docs(6)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    store = tmp_path / "store"
    args = ["warm", str(corpus), "--store", str(store), "--model", str(tiny_model_dir), "--kv-bits", "8",
            "--batch-size", "4", "--no-progress", "--json", "-", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "encoded          6" in out
    report = json.loads(out[out.index("{"):])
    assert report["encoded"] == 6 and report["bytes_written"] > 0
    assert main(args) == 0  # rerun: everything already there
    assert "skipped (stored) 6" in capsys.readouterr().out
    assert main(["inspect", "--store", str(store), "--verify"]) == 0
    assert "kv_bits 8" in capsys.readouterr().out

    prompt = f"Context:\n{docs[3]}\n{docs[1]}\nQuestion: what is in the documents?"
    assert main(["ask", "--store", str(store), "--model", str(tiny_model_dir), "--device", "cpu",
                 "--max-new-tokens", "3", "--raw", "--json", prompt]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["completion_tokens"] <= 3
    assert result["reused_tokens"] + result["recomputed_tokens"] > 0, "warmed documents were found and reused"

    doc_file = tmp_path / "doc.txt"
    doc_file.write_text(docs[0])
    assert main(["ask", "--store", str(store), "--model", str(tiny_model_dir), "--device", "cpu",
                 "--max-new-tokens", "2", "--doc", str(doc_file), "Summarise."]) == 0
    captured = capsys.readouterr()
    assert "reused" in captured.err and "TTFT" in captured.err


def test_warm_missing_corpus_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    assert main(["warm", str(tmp_path / "nope.jsonl"), "--store", str(tmp_path / "s"), "--model",
                 str(tiny_model_dir), "--no-progress", "--device", "cpu"]) == 1
    assert "does not exist" in capsys.readouterr().err
