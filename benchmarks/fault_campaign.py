"""Fault campaign against a DiskStore: kills during writes, concurrent processes, hostile files.

    .venv/bin/python benchmarks/fault_campaign.py --quick        # about 30 s on 2 cores
    .venv/bin/python benchmarks/fault_campaign.py --json out.json

Sections (each prints a table row; everything is also printed as JSON at the end). Stores are
16-bit (``kv_bits=16``) so that a served entry can be compared with what was written, bit for bit:


a. kills: a forked writer puts large entries back to back and is SIGKILLed at a random moment,
   N times. After each kill the store is reopened: entries served with the wrong content
   (``corrupt_served``) and entries whose put had returned but are now missing (``finished_lost``)
   must both be 0; temp files left by the killed writer must be gone after the reopen.
b. concurrency: writer and reader processes share one store; every read is checked against the
   version its header names (``corrupt_served`` must be 0).
c. faults: one hostile file-system state per row (directory / FIFO / 20 GB sparse file / wrong
   header types / unreadable file / symlinks out of the root / foreign model files / stale temp
   files), then every store operation and ``kvboost-rag inspect --verify [--repair]`` on it, each
   under a timeout. ``crashes``, ``hangs``, ``bad_served`` and ``foreign_touched`` must be 0.
   A ``put`` onto a directory, FIFO or symlink squatting an entry's path is refused with a
   StoreError (a clear refusal, not a crash) and leaves it untouched.
d. bad inputs: :func:`bad_input_section`, the engine, CLI and integration inputs of
   ``bad_input_campaign.py``.

``--sections`` runs some of them (tests/store/test_fault_campaign.py runs the quick form of the
first three; the bad inputs have their own tests). Exit code 1 if any must-be-zero figure is not.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvboost_rag.kv.chunk import KVChunk  # noqa: E402
from kvboost_rag.store.disk import DiskStore  # noqa: E402
from kvboost_rag.store.entry_format import _checksum, _dtype_name, _tensor_bytes  # noqa: E402
from kvboost_rag.errors import StoreError  # noqa: E402

FP = "campaign-fp"
CTX = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


# ------------------------------------------------------------------ content with a checkable label
@functools.lru_cache(maxsize=16)
def pattern(shape, seed: int) -> torch.Tensor:
    """Deterministic tensor for ``seed`` (cached: writers spend their time writing, not making
    data, so a random kill usually lands inside a put)."""
    n = math.prod(shape)
    return ((torch.arange(n, dtype=torch.int64) * (2 * seed + 1)) % 1021).to(torch.float16).reshape(shape)


def labelled_chunk(key: str, version: int, shape) -> KVChunk:
    """A chunk whose text names the seed of its content, so any reader can check what it got."""
    seed = (int(hashlib.sha1(key.encode()).hexdigest()[:6], 16) + version) % 4
    shape = tuple(shape)
    return KVChunk(pattern(shape, seed), pattern(shape, seed + 1), 0, tuple(range(shape[2])), FP,
                   f"{key}|{version}|{seed}", {"encoding_version": "1"})


def served_correctly(chunk: KVChunk) -> bool:
    """Whether a fetched chunk holds exactly what its own label says was written."""
    try:
        _, _, seed = chunk.text.split("|")
        seed = int(seed)
        shape = tuple(chunk.keys.shape)
        return torch.equal(chunk.keys, pattern(shape, seed)) and torch.equal(chunk.values, pattern(shape, seed + 1))
    except Exception:
        return False


def key_name(i: int) -> str:
    return f"k{i:03d}" + "x" * 28


# ------------------------------------------------------------------ a. kills
def _kill_writer(root: str, start: int, pool: int, shape, wfd: int) -> None:
    torch.set_num_threads(1)
    store = DiskStore(root, kv_bits=16)
    version = 0
    while True:
        version += 1
        for i in range(start, start + pool):
            key = key_name(i % pool)
            store.put(key, labelled_chunk(key, version, shape))
            os.write(wfd, (key + "\n").encode())  # only after put returned: the entry is final


def kill_section(base: Path, kills: int, shape, rng: random.Random) -> dict:
    root = base / "kills"
    pool = 12
    finished: set = set()
    for seed in range(5):  # filled before forking: the writers inherit it and start writing at once
        pattern(tuple(shape), seed)
    out = {"kills": 0, "corrupt_served": 0, "finished_lost": 0, "temp_left_by_kill": 0, "temp_after_reopen": 0,
           "entries_checked": 0, "entry_mb": round(2 * math.prod(shape) * 2 / 2**20, 1)}
    for _ in range(kills):
        rfd, wfd = os.pipe()
        proc = CTX.Process(target=_kill_writer, args=(str(root), rng.randrange(pool), pool, shape, wfd), daemon=True)
        proc.start()
        os.close(wfd)
        time.sleep(rng.uniform(0.15, 1.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        out["kills"] += 1
        with os.fdopen(rfd, "rb") as f:
            done = [line.decode().strip() for line in f.read().splitlines() if line.strip()]
        out["puts_finished"] = out.get("puts_finished", 0) + len(done)
        finished.update(done)
        out["temp_left_by_kill"] += len(list(root.glob("*/.*.tmp")))
        store = DiskStore(root, kv_bits=16)  # reopen: removes the dead writer's temp files
        out["temp_after_reopen"] += len(list(root.glob("*/.*.tmp")))
        for key in sorted(set(store.keys()) | finished):
            chunk = store.get(key, FP)
            out["entries_checked"] += 1
            if chunk is None:
                out["finished_lost"] += key in finished
            elif not served_correctly(chunk):
                out["corrupt_served"] += 1
    out["finished_entries"] = len(finished)
    return out


# ------------------------------------------------------------------ b. concurrency
def _writer(root: str, seed: int, seconds: float, shape, q) -> None:
    torch.set_num_threads(1)
    rng, store, n = random.Random(seed), DiskStore(root, kv_bits=16), 0
    deadline = time.time() + seconds
    while time.time() < deadline:
        key = key_name(rng.randrange(16))
        store.put(key, labelled_chunk(key, rng.randrange(10**6), shape))
        n += 1
    q.put(("writes", n, 0, 0))


def _reader(root: str, seed: int, seconds: float, q) -> None:
    torch.set_num_threads(1)
    rng, store = random.Random(seed), DiskStore(root, kv_bits=16)
    reads = hits = bad = 0
    deadline = time.time() + seconds
    while time.time() < deadline:
        chunk = store.get(key_name(rng.randrange(16)), FP)
        reads += 1
        if chunk is not None:
            hits += 1
            bad += not served_correctly(chunk)
    q.put(("reads", reads, hits, bad))


def concurrency_section(base: Path, seconds: float, writers: int, readers: int, shape) -> dict:
    root = str(base / "concurrent")
    q = CTX.Queue()
    procs = [CTX.Process(target=_writer, args=(root, i, seconds, shape, q)) for i in range(writers)]
    procs += [CTX.Process(target=_reader, args=(root, 100 + i, seconds, q)) for i in range(readers)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    store = DiskStore(root, kv_bits=16)
    return {"writers": writers, "readers": readers, "seconds": seconds,
            "writes": sum(r[1] for r in results if r[0] == "writes"),
            "reads": sum(r[1] for r in results if r[0] == "reads"),
            "hits": sum(r[2] for r in results if r[0] == "reads"),
            "corrupt_served": sum(r[3] for r in results if r[0] == "reads"),
            "corrupt_after": len(store.verify()), "crashed_processes": sum(p.exitcode != 0 for p in procs),
            "temp_left": len(list(Path(root).glob("*/.*.tmp")))}


# ------------------------------------------------------------------ c. hostile files
GOOD, BAD = key_name(1), key_name(2)
SMALL = (2, 2, 8, 16)


def rewritten(blob: bytes, **fields) -> bytes:
    """An entry with header fields replaced and its checksum recomputed (only validation catches it)."""
    from safetensors.torch import load, save

    (n,) = struct.unpack("<Q", blob[:8])
    metadata = {**json.loads(blob[8 : 8 + n])["__metadata__"], **fields}
    metadata.pop("xxh3_128")
    tensors = load(blob)
    pieces = [(k, _dtype_name(t.dtype), list(t.shape), _tensor_bytes(t)) for k, t in tensors.items()]
    metadata["xxh3_128"] = _checksum(metadata, pieces, "xxh3_128")
    return save(tensors, metadata=metadata)


def make_fault(kind: str, root: Path, outside: Path, blob: bytes) -> list:
    """Create the hostile state ``kind`` (the good entry is already in ``root``); returns the
    files in it that the store itself wrote (which it may remove)."""
    bad = root / BAD[:2] / f"{BAD}.safetensors"
    if kind == "directory entry":
        bad.mkdir()
        (bad / "inner.bin").write_bytes(b"someone else's")
    elif kind == "FIFO entry":
        os.mkfifo(bad)
    elif kind == "sparse 20 GB entry":
        bad.write_bytes(blob)
        os.truncate(bad, 20 << 30)
    elif kind == "wrong-type header":
        bad.write_bytes(rewritten(blob, num_tokens="q0", start="x"))
    elif kind == "unreadable entry":
        bad.write_bytes(blob)
        bad.chmod(0)
    elif kind == "symlink entry out of root":
        (outside / "entry.safetensors").write_bytes(blob)
        bad.symlink_to(outside / "entry.safetensors")
    elif kind == "symlinked shard out of root":
        (outside / "zz").mkdir()
        (outside / "zz" / ("zz" + "y" * 30 + ".safetensors")).write_bytes(blob)
        (root / "zz").symlink_to(outside / "zz", target_is_directory=True)
    elif kind == "model.safetensors next to store":
        (root.parent / "model.safetensors").write_bytes(b"weights")
        (root.parent / "config.json").write_text("{}")
    elif kind == "model.safetensors inside store":
        (root / "model.safetensors").write_bytes(b"weights")
        (root / "config.json").write_text("{}")
    elif kind == "foreign safetensors in a shard":
        from safetensors.torch import save

        (root / "mo").mkdir()
        (root / "mo" / "model.safetensors").write_bytes(save({"w": torch.ones(3)}, metadata={"format": "pt"}))
    elif kind == "stale temp of dead writer":
        dead = CTX.Process(target=int)
        dead.start()
        dead.join()
        from kvboost_rag.store.safe_files import _HOST

        stale = bad.parent / f".{BAD}.safetensors.{_HOST}.{dead.pid}.0123abcd.tmp"
        stale.write_bytes(b"partial")
        (bad.parent / f".{BAD}.safetensors.{_HOST}.{os.getpid()}.4567abcd.tmp").write_bytes(b"live writer's")
        return [stale]
    else:
        raise ValueError(kind)
    return [bad] if kind in ("sparse 20 GB entry", "wrong-type header", "unreadable entry") else []


FAULTS = ["directory entry", "FIFO entry", "sparse 20 GB entry", "wrong-type header", "unreadable entry",
          "symlink entry out of root", "symlinked shard out of root", "model.safetensors next to store",
          "model.safetensors inside store", "foreign safetensors in a shard", "stale temp of dead writer"]
def snapshot(base: Path, own: list) -> dict:
    """Every file (and symlink) under ``base`` but the store's own: what must come out untouched."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            if p in own or name.startswith((GOOD, key_name(3))):
                continue
            st = os.lstat(p)
            if os.path.islink(p):
                out[str(p)] = ("link", os.readlink(p))
            elif not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20 or not os.access(p, os.R_OK):
                out[str(p)] = ("stat", st.st_mode, st.st_size, st.st_ino)
            else:
                out[str(p)] = ("sha", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@contextlib.contextmanager
def denied(path: Path, active: bool):
    """Make ``path`` unreadable for this process even as root (where mode 000 does not stop reads)."""
    if not active:
        yield
        return
    real_open = os.open

    def fake_open(p, *a, **k):
        if os.fspath(p) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_open(p, *a, **k)

    os.open = fake_open
    try:
        yield
    finally:
        os.open = real_open


def timed(seconds: float, fn):
    """(value, error, hung) of ``fn()`` run in a daemon thread."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return box.get("value"), box.get("error"), t.is_alive()


def cli(root: Path, *args) -> int:
    from kvboost_rag.app.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(["inspect", "--store", str(root), *args])


SQUATTERS = ("directory entry", "FIFO entry", "symlink entry out of root")


def put_refusing_squatters(store: DiskStore, kind: str) -> None:
    """A put of the bad key: refused with a StoreError where a directory, FIFO or symlink squats
    its path (anything else escaping is a crash); a plain write elsewhere."""
    try:
        store.put(BAD, labelled_chunk(BAD, 2, SMALL))
    except StoreError as exc:
        if kind not in SQUATTERS or "remove it by hand" not in str(exc):
            raise RuntimeError(f"unexpected refusal: {exc}") from exc
        return
    if kind in SQUATTERS:
        raise RuntimeError("a put replaced a file the store did not write")


def fault_section(base: Path, timeout: float) -> dict:
    rows, totals = {}, {"crashes": 0, "hangs": 0, "bad_served": 0, "foreign_touched": 0, "stale_temp_left": 0}
    for kind in FAULTS:
        case = base / "faults" / kind.replace(" ", "_")
        root, outside = case / "store", case / "outside"
        outside.mkdir(parents=True)
        store = DiskStore(root, kv_bits=16)
        store.put(GOOD, labelled_chunk(GOOD, 1, SMALL))
        blob = labelled_chunk(BAD, 1, SMALL)
        (root / BAD[:2]).mkdir(exist_ok=True)
        scratch = DiskStore(case / "scratch", kv_bits=16)
        scratch.put(BAD, blob)
        raw = scratch.path_for(BAD).read_bytes()
        shutil.rmtree(case / "scratch")
        pre = DiskStore(root, max_bytes=1, kv_bits=16)  # opened before the fault: a running process meeting it
        own = make_fault(kind, root, outside, raw)
        before = snapshot(case, own)
        expect_refused = kind in ("model.safetensors inside store", "symlinked shard out of root")
        row = {"crashes": [], "hangs": [], "bad_served": 0, "refused": False}

        def op(name, fn):
            value, error, hung = timed(timeout, fn)
            if hung:
                row["hangs"].append(name)
            elif error is not None and not (expect_refused and isinstance(error, StoreError)):
                row["crashes"].append(f"{name}: {type(error).__name__}: {error}"[:160])
            elif error is not None:
                row["refused"] = True
            return value

        with denied(root / BAD[:2] / f"{BAD}.safetensors", kind == "unreadable entry" and os.geteuid() == 0):
            row["cli_verify_rc"] = op("cli inspect --verify", lambda: cli(root, "--verify"))
            opened = op("open", lambda: DiskStore(root, max_bytes=1, kv_bits=16)) or pre
            if opened is not None:
                op("verify", opened.verify)
                op("entries", lambda: list(opened.entries()))
                op("texts", lambda: list(opened.texts(FP)))
                op("contains", lambda: opened.contains(BAD, FP))
                row["bad_served"] += op("get", lambda: opened.get(BAD, FP)) is not None
                good = op("get good", lambda: opened.get(GOOD, FP))
                row["bad_served"] += good is None or not served_correctly(good)
            row["cli_repair_rc"] = op("cli inspect --verify --repair", lambda: cli(root, "--verify", "--repair"))
            if opened is not None:
                op("put over the bad entry", lambda: put_refusing_squatters(opened, kind))
                op("evict", lambda: opened.put(key_name(3), labelled_chunk(key_name(3), 1, SMALL)))
                op("clear", opened.clear)
        after = snapshot(case, own)
        row["foreign_touched"] = sorted(p for p in before if before[p] != after.get(p))
        row["stale_temp_left"] = sum(p.exists() for p in own if p.suffix == ".tmp")  # open must clean them
        with contextlib.suppress(OSError):
            (root / BAD[:2] / f"{BAD}.safetensors").chmod(0o644)
        rows[kind] = row
        totals["crashes"] += len(row["crashes"])
        totals["hangs"] += len(row["hangs"])
        totals["bad_served"] += row["bad_served"]
        totals["foreign_touched"] += len(row["foreign_touched"])
        totals["stale_temp_left"] += row["stale_temp_left"]
    return {"totals": totals, "faults": rows}


# ------------------------------------------------------------------ d. bad inputs
def bad_input_section(quick: bool) -> dict:
    """Every bad engine/CLI input of ``bad_input_campaign.py`` (the same cases quick or not):
    tried, clear errors, and the names of raw exceptions and silently accepted inputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bad_input_campaign import run_bad_inputs

    figures = run_bad_inputs()
    figures.pop("details", None)
    return figures


# ------------------------------------------------------------------ driver
SECTIONS = ("kills", "concurrency", "faults", "bad-inputs")


def _sections(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or [text]}; choose from {', '.join(SECTIONS)}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fault_campaign.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="8 kills of 8 MB puts and a 4 s concurrent run instead of 40 and 20 s (~35 s in all)")
    ap.add_argument("--kills", type=int, default=None, metavar="N",
                    help="SIGKILLs during puts (default: 8 quick, 40 full)")
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the kill timing (default: 0)")
    ap.add_argument("--sections", type=_sections, default=SECTIONS, metavar="LIST",
                    help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    kills = args.kills if args.kills is not None else (8 if args.quick else 40)
    big = (4, 8, 1024, 64) if args.quick else (8, 8, 2048, 64)
    t0 = time.time()
    base = Path(tempfile.mkdtemp(prefix="kvb-faults-"))
    runs = {"kills": lambda: kill_section(base, kills, big, rng),
            "concurrency": lambda: concurrency_section(base, 4.0 if args.quick else 20.0, 2, 2, (2, 4, 256, 64)),
            "faults": lambda: fault_section(base, timeout=20.0),
            "bad-inputs": lambda: bad_input_section(args.quick)}
    results, section_seconds = {}, {}
    try:
        for name in SECTIONS:
            if name in args.sections:
                t_section = time.time()
                results[name.replace("-", "_")] = runs[name]()
                section_seconds[name] = round(time.time() - t_section, 1)
    finally:
        for p in base.rglob("*"):  # a mode-000 file cannot stop the cleanup
            with contextlib.suppress(OSError):
                if not p.is_symlink():
                    p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(base, ignore_errors=True)
    results["seconds"] = round(time.time() - t0, 1)
    results["section_seconds"] = section_seconds
    k, c, f, b = (results.get(n) for n in ("kills", "concurrency", "faults", "bad_inputs"))
    must_be_zero = {}
    if k is not None:
        must_be_zero.update({"kills.corrupt_served": k["corrupt_served"], "kills.finished_lost": k["finished_lost"],
                             "kills.temp_after_reopen": k["temp_after_reopen"]})
    if c is not None:
        must_be_zero.update({"concurrency.corrupt_served": c["corrupt_served"],
                             "concurrency.corrupt_after": c["corrupt_after"],
                             "concurrency.crashed_processes": c["crashed_processes"]})
    if f is not None:
        must_be_zero.update({f"faults.{n}": v for n, v in f["totals"].items()})
    if b is not None:
        must_be_zero["bad_inputs.not_clear"] = len(b["raw_exception"]) + len(b["silently_accepted"])
    results["must_be_zero"] = must_be_zero
    print(f"{'section':<12} {'figures'}")
    if k is not None:
        print(f"{'kills':<12} {k['kills']} SIGKILLs during {k['entry_mb']} MB puts, {k['puts_finished']} puts finished "
              f"({k['finished_entries']} keys), {k['entries_checked']} reads checked: corrupt served "
              f"{k['corrupt_served']}, finished lost {k['finished_lost']}, kills mid-write (temp file left) "
              f"{k['temp_left_by_kill']} -> after reopen {k['temp_after_reopen']}")
    if c is not None:
        print(f"{'concurrency':<12} {c['writers']} writers + {c['readers']} readers for {c['seconds']} s: {c['writes']} "
              f"writes, {c['reads']} reads ({c['hits']} hits): corrupt served {c['corrupt_served']}, corrupt after "
              f"{c['corrupt_after']}")
    for kind, row in (f["faults"].items() if f is not None else ()):
        print(f"{'fault':<12} {kind:<32} crashes {len(row['crashes'])} hangs {len(row['hangs'])} bad served "
              f"{row['bad_served']} foreign touched {len(row['foreign_touched'])} refused {row['refused']!s:<5} "
              f"cli rc {row['cli_verify_rc']}/{row['cli_repair_rc']}")
        for line in row["crashes"] + row["hangs"] + row["foreign_touched"]:
            print(f"{'':<12}   ! {line}")
    if b is not None:
        print(f"{'bad inputs':<12} {b}")
    print(f"{'seconds':<12} {section_seconds}")
    failed = {n: v for n, v in must_be_zero.items() if v}
    print(f"{'verdict':<12} {'OK: every must-be-zero figure is 0' if not failed else f'FAIL: {failed}'} ({results['seconds']} s)")
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
