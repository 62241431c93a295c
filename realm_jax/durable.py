"""Durable writes, shared by everything that publishes files (block stores, embedding
shards, index snapshots, checkpoint markers, predictions): fsync of files and folders on
local disks, and whole-file writes that a crash leaves old or new, never half-written (a
temporary file beside the target, fsynced, then renamed over it).

Paths with a scheme (gs://...) go through etils' epath: an object store makes each write
visible whole, and there is nothing to fsync.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Callable

TRASH_PREFIX = ".trash-"
TMP_PREFIX = ".tmp-"


def is_local(path: str | os.PathLike) -> bool:
    return "://" not in os.fspath(path)


@contextlib.contextmanager
def naming_disk_full(where: str | os.PathLike) -> Iterator[None]:
    """Re-raise a "no space left on device" error that names no file as one that names
    `where` (what was being written), so the user is told where the disk filled up."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC and not e.filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(where)) from e
        raise


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


def discard(folder: str | os.PathLike) -> bool:
    """Delete a folder so that a crash never leaves half of it under its name: renamed to
    `.trash-RANDOM-NAME` beside it (atomic), then removed (a `.trash-*` left by a crash is
    for the owner's cleanup). False when the rename fails (e.g. it is gone already)."""
    from etils import epath

    folder = epath.Path(folder)
    trash = folder.parent / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}-{folder.name}"
    try:
        folder.rename(trash)
    except OSError:
        return False
    fsync_dir(folder.parent)
    if is_local(trash):
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.rmtree(missing_ok=True)
    return True


def replace_folder(tmp: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rename the finished folder `tmp` to `folder` (local disk). An existing `folder` is
    first renamed aside (`.NAME.old-RANDOM`, removed after), so the name always holds a
    whole folder, the old or the new one."""
    folder = Path(folder)
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:12]}"
    if folder.exists():
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except OSError:
        if old.exists():
            os.rename(old, folder)  # the old folder back under its name
        raise
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def tmp_name(kind: str) -> str:
    """`.tmp-KIND-RANDOM-PID-HOST`: whoever cleans up can tell whether its writer is alive."""
    return f"{TMP_PREFIX}{kind}-{uuid.uuid4().hex[:12]}-{os.getpid()}-{socket.gethostname()}"


def tmp_writer(name: str) -> tuple[int, str]:
    """(pid, host) of the writer of a file named by `tmp_name` (after any prefix); (-1, "")
    when the name does not say."""
    parts = name.rpartition(TMP_PREFIX)[2].split("-", 3)
    try:
        return int(parts[2]), parts[3]
    except (IndexError, ValueError):
        return -1, ""


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


class LockHeld(FileExistsError):
    """Another live process holds the lock; the message names it."""


class ProcessLock:
    """An exclusive lock file, `{"pid", "host", "nonce", "started"}` in JSON, for one process
    of a kind per folder (local disks).

    Taken by hard-linking a complete temporary file to the lock's name (atomic; fails when
    the name exists). A lock whose pid is dead on this host is stale: it is taken over by
    replacing the file, under an flock on the lock's folder so that two newcomers cannot both
    take it, and only when the file still holds what was judged stale. A lock of another
    host is never judged stale (its pid means nothing here): the message says to delete it
    when that process is gone. `release` removes the file only if it is still this lock;
    the temporary files of takers killed on this host are removed by the next taker.
    """

    def __init__(self, path: str | os.PathLike, holder: dict[str, Any]):
        self.path = os.fspath(path)
        self.holder = holder

    @classmethod
    def acquire(cls, path: str | os.PathLike, what: str) -> ProcessLock:
        import fcntl

        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "nonce": uuid.uuid4().hex,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        tmp = path + tmp_name("lock")
        _remove_dead_tmps(path)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            for _ in range(10):
                try:
                    _create_exclusive(tmp, path, me)
                    fsync_dir(os.path.dirname(path) or ".")
                    return cls(path, me)
                except FileExistsError:
                    pass
                holder = _read_json(path)
                if holder is None or not _stale(holder):
                    if holder is None and not os.path.exists(path):
                        continue  # released meanwhile
                    who = ("an unreadable lock" if holder is None else
                           f"pid {holder.get('pid')} on host {holder.get('host')} since "
                           f"{holder.get('started')}")
                    raise LockHeld(f"another {what} holds {path}: {who}; stop it first (if it "
                                   "is gone, e.g. its machine was lost, delete that file)")
                guard = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
                try:
                    try:
                        fcntl.flock(guard, fcntl.LOCK_EX)
                    except OSError:  # a file system without flock: best effort
                        pass
                    if _read_json(path) == holder:  # still the stale one: take it over
                        os.replace(tmp, path)
                        fsync_dir(os.path.dirname(path) or ".")
                        return cls(path, me)
                finally:
                    os.close(guard)  # (releases the flock)
            raise LockHeld(f"could not take {path}: it keeps changing")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def release(self) -> None:
        if _read_json(self.path) == self.holder:
            os.unlink(self.path)

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _create_exclusive(tmp: str, path: str, content: dict[str, Any]) -> None:
    """Create `path` holding `content`, or raise FileExistsError: a hard link of the complete
    `tmp` (never seen half-written); where links are not supported (some FUSE mounts of
    buckets), an exclusive create, then the write."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(content, f)


def _remove_dead_tmps(path: str) -> None:
    """Remove the temporary files (`PATH` + `tmp_name`) of takers of the lock at `path`
    killed on this host before they could remove them."""
    for leftover in glob.glob(glob.escape(path) + TMP_PREFIX + "*"):
        pid, host = tmp_writer(leftover)
        if _stale({"pid": pid, "host": host}):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stale(holder: Any) -> bool:
    """A lock whose process is dead on this host."""
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid > 0 and not process_alive(pid)
