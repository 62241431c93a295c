"""realm_jax.durable: a whole-file write replaces the target whole or not at all; a folder is
replaced whole; a lock taker killed on this host leaves nothing the next taker keeps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from realm_jax import durable


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "LATEST"
    durable.atomic_write_text(target, "v000001\n")  # makes the folder
    assert target.read_text() == "v000001\n"
    durable.atomic_write(target, lambda f: f.write(b"v000002\n"), binary=True,
                         tmp_name=".tmp-latest-1")
    assert target.read_text() == "v000002\n"

    def crash(f):
        f.write("v0000")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        durable.atomic_write(target, crash)
    assert target.read_text() == "v000002\n"           # the old content, untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["LATEST"]  # no leftovers
    durable.fsync_file(target)
    durable.fsync_dir(target.parent)
    assert not durable.is_local("gs://bucket/x") and durable.is_local(target)


def test_replace_folder_and_discard_keep_a_whole_folder_under_the_name(tmp_path):
    folder, tmp = tmp_path / "params", tmp_path / ".params.tmp"
    for version in ("old", "new"):
        tmp.mkdir()
        (tmp / "model.json").write_text(version)
        durable.replace_folder(tmp, folder)
        assert (folder / "model.json").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]  # the old one is gone

    with pytest.raises(FileNotFoundError):  # a failed rename: the old folder stays in place
        durable.replace_folder(tmp_path / "missing", folder)
    assert (folder / "model.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]

    assert durable.discard(folder)
    assert list(tmp_path.iterdir()) == []  # renamed aside, then removed
    assert not durable.discard(folder)  # gone already


def test_next_taker_removes_dead_takers_temporary_files(tmp_path):
    """A taker killed between writing `PATH.tmp-lock-RANDOM-PID-HOST` and removing it: the
    next taker removes that file when its process is dead on this host, and only then."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    lock = tmp_path / "lock"
    killed = tmp_path / f"lock.tmp-lock-0123456789ab-{dead.pid}-{host}"
    alive = tmp_path / f"lock.tmp-lock-ba9876543210-{os.getpid()}-{host}"
    elsewhere = tmp_path / f"lock.tmp-lock-aaaaaaaaaaaa-{dead.pid}-another-host"
    for path in (killed, alive, elsewhere):
        path.write_text("{}")
    with durable.ProcessLock.acquire(lock, "test"):
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["lock", alive.name, elsewhere.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name])
