"""Durable writes, shared by everything that publishes files (block stores, embedding
shards, index snapshots, checkpoint markers, predictions): fsync of files and folders on
local disks, and whole-file writes that a crash leaves old or new, never half-written (a
temporary file beside the target, fsynced, then renamed over it).

Paths with a scheme (gs://...) go through etils' epath: an object store makes each write
visible whole, and there is nothing to fsync.
"""

from __future__ import annotations

import os
import uuid
from typing import IO, Any, Callable


def is_local(path: str | os.PathLike) -> bool:
    return "://" not in os.fspath(path)


def fsync_file(path: str | os.PathLike) -> None:
    if is_local(path):
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the names created or renamed in a folder survive a crash. Some file systems
    refuse to fsync a folder; there a rename is as durable as they make it."""
    if is_local(path):
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], *,
                 binary: bool = False, tmp_name: str | None = None) -> None:
    """Write `path` whole through `write(file)` (text files are UTF-8): into `tmp_name` in
    the same folder (default `.NAME.tmp-RANDOM`), fsynced, then renamed over `path`. The
    temporary file is removed when writing fails."""
    from etils import epath

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (tmp_name or f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    mode = "wb" if binary else "w"
    try:
        if is_local(path):
            with open(os.fspath(tmp), mode, **({} if binary else {"encoding": "utf-8"})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with tmp.open(mode) as f:
                write(f)
            tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))
