"""A warm job survives a store that refuses writes: a directory squatting an entry's path, a full
disk. The failing document is a failed row with the reason, the rest is stored, the report (and
``--json`` file) is always written, and ``kvboost-rag warm`` exits 1 naming the problem."""
from __future__ import annotations

import errno
import json
import subprocess


from kvboost_rag.app.cli import main
from kvboost_rag.app.warm import warm_corpus
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.index.context import ContextConfig
from kvboost_rag.testing.store import PYTHON, FakeEngine, make_docs, python_env

SQUAT = "not a file this store wrote; remove it by hand"


def _corpus(tmp_path, docs):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    return corpus


def _warm_args(corpus, store, model_dir, report):
    return ["warm", str(corpus), "--store", str(store), "--model", str(model_dir), "--context", "none",
            "--batch-size", "4", "--no-progress", "--device", "cpu", "--json", str(report)]


def test_a_directory_at_an_entry_path_fails_one_document_not_the_job(tmp_path, tiny_model_dir, capsys):
    docs = make_docs(6, seed=3)
    corpus, store = _corpus(tmp_path, docs), tmp_path / "store"
    assert main(_warm_args(corpus, store, tiny_model_dir, tmp_path / "r0.json")) == 0
    paths = sorted(DiskStore(store)._iter_paths())
    assert len(paths) == 6
    squatted, deleted = paths[0], paths[1:4]
    squatted.unlink()
    squatted.mkdir()  # mkdir -p S/<shard>/<key>.safetensors
    (squatted / "notes.txt").write_text("someone else's")
    for p in deleted:
        p.unlink()
    capsys.readouterr()

    report_file = tmp_path / "report.json"
    assert main(_warm_args(corpus, store, tiny_model_dir, report_file)) == 1
    captured = capsys.readouterr()
    assert "Errno" not in captured.err
    assert "refused 1 encoded document" in captured.err
    report = json.loads(report_file.read_text())
    assert report["encoded"] == 3 and report["skipped"] == 2 and report["store_errors"] == 1
    (failure,) = report["failed"]
    assert SQUAT in failure["reason"] and str(squatted) in failure["reason"]
    assert all(p.is_file() for p in deleted)  # the rest of the batch was stored
    assert (squatted / "notes.txt").read_text() == "someone else's"

    assert main(["inspect", "--store", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    assert SQUAT in out and str(squatted) in out
    assert main(["inspect", "--store", str(store), "--verify", "--repair"]) == 1
    out = capsys.readouterr().out
    assert SQUAT in out and "left in place" in out
    assert (squatted / "notes.txt").exists()  # --repair never removes what the store did not write


def test_verify_names_a_squatting_directory(tmp_path):
    store = DiskStore(tmp_path)
    engine = FakeEngine(store=store)
    warm_corpus(make_docs(2), engine, progress=False)
    path = sorted(store._iter_paths())[0]
    path.unlink()
    path.mkdir()
    for remove in (False, True):
        ((key, reason),) = store.verify(remove=remove)
        assert reason.startswith("a directory at the entry path is " + SQUAT) and str(path) in reason
    assert path.is_dir()


class FullDisk(DiskStore):
    """A store on a disk that fills up after ``room`` entries."""

    def __init__(self, root, room: int) -> None:
        super().__init__(root)
        self.room = room

    def put(self, key, chunk):
        if self.room <= 0:
            raise OSError(errno.EFBIG, "File too large", str(self.path_for(key)))
        self.room -= 1
        return super().put(key, chunk)


def test_a_full_disk_fails_the_documents_it_refuses_and_the_job_goes_on(tmp_path):
    store = FullDisk(tmp_path, room=3)
    engine = FakeEngine(store=store)
    report = warm_corpus(make_docs(8), engine, batch_size=2, progress=False,
                         context=ContextConfig(neighbour_kv="computed"))  # one entry per document
    assert report.encoded == 3 and report.store_errors == 5 and len(report.failed) == 5
    assert all("File too large" in r and "free disk space" in r for _, r in report.failed)
    assert len(DiskStore(tmp_path)) == 3
    assert json.loads(json.dumps(report.to_dict()))["store_errors"] == 5
    assert "refused by the store" in report.summary()


FULL_DISK_WARM = """
import resource, sys
from kvboost_rag.app.cli import main
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # every file larger than this: EFBIG
sys.exit(main(sys.argv[2:]))
"""


def test_warm_on_a_full_disk_writes_its_report_and_exits_1(tmp_path, tiny_model_dir):
    docs = make_docs(4, seed=5, min_words=30, max_words=40)  # entries far above the limit
    corpus, store, report_file = _corpus(tmp_path, docs), tmp_path / "store", tmp_path / "report.json"
    proc = subprocess.run([PYTHON, "-c", FULL_DISK_WARM, str(4 << 10),
                           *_warm_args(corpus, store, tiny_model_dir, report_file)],
                          env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(report_file.read_text())
    assert report["documents"] == 4 and report["store_errors"] == 4 and report["encoded"] == 0
    assert all("File too large" in f["reason"] for f in report["failed"])
    assert len(DiskStore(store)) == 0 and not list(store.glob("*/.*.tmp"))  # nothing half-written left
