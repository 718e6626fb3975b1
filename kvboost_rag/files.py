"""File-system helpers shared by every writer of files (the disk store, packaged models): atomic,
durable replacement of a file.

:func:`atomic_file` is the one way the package replaces a file that other processes may be
reading: the new content goes to a temp file in the *same* directory, is flushed and fsynced,
then ``os.replace``-d over the target, so a reader sees the old file or the whole new one, never a
part; on any error the temp file is deleted. :func:`fsync_dir` makes the rename itself survive
power loss. Callers choose the temp file's name (the disk store names it so that it can later
recognise and reclaim the temp files of killed writers) and whether to fsync at all.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(target: Path, *, temp: Optional[Path] = None, fsync: bool = True,
                sync_dir: bool = False) -> Iterator[BinaryIO]:
    """Write ``target`` atomically: yields a binary file to write the new content into.

    On a clean exit the file is flushed, fsynced (if ``fsync``), closed and renamed over
    ``target``; on any error (the caller's included) it is deleted and the error re-raised, and
    ``target`` is left as it was.

    temp: the temp file's path, which must be in ``target``'s directory; it is created with
        ``O_EXCL`` (mode 0o644 before the umask), so an existing file is never reused. None ->
        a fresh ``<target name>.<random>.tmp`` beside ``target`` (``tempfile.mkstemp``, mode 0o600).
    fsync: fsync the file before the rename (off only for throwaway data).
    sync_dir: after the rename, also fsync ``target``'s directory (with ``fsync``) so the rename
        survives power loss; leave it off to fsync once after several renames.
    """
    if temp is None:
        fd, name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        temp = Path(name)
    else:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    if fsync and sync_dir:
        fsync_dir(target.parent)
