"""ProcessLock: a taker killed between writing its temporary file and removing it leaves
`PATH.tmp-lock-RANDOM-PID-HOST`; the next taker removes it when that process is dead here."""

import os
import socket
import subprocess
import sys

from realm_jax.durable import ProcessLock


def test_next_taker_removes_dead_takers_temporary_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    lock = tmp_path / "lock"
    killed = tmp_path / f"lock.tmp-lock-0123456789ab-{dead.pid}-{host}"
    alive = tmp_path / f"lock.tmp-lock-ba9876543210-{os.getpid()}-{host}"
    elsewhere = tmp_path / f"lock.tmp-lock-aaaaaaaaaaaa-{dead.pid}-another-host"
    for path in (killed, alive, elsewhere):
        path.write_text("{}")
    with ProcessLock.acquire(lock, "test"):
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["lock", alive.name, elsewhere.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name])
