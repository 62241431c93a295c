"""Versioned index snapshots (realm_jax.index.store): publish, load, prune, validation,
the watcher's fallback, and crash safety under SIGKILL."""

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from realm_jax.index import base
from realm_jax.index.scann_searcher import ScannSearcher, ScannSettings
from realm_jax.index.store import IndexStore, SnapshotError, SnapshotWatcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _emb(n=300, dim=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _publish(store, step, **kwargs):
    kwargs.setdefault("embeddings", _emb(seed=step))
    return store.publish(step=step, model_fingerprint=f"model@{step}",
                         corpus_fingerprint="corpus-1", **kwargs)


def test_publish_latest_prune(tmp_path):
    store = IndexStore(tmp_path / "index", keep=2)
    assert store.latest() is None and store.versions() == []
    for step in (100, 200, 300, 400):
        snap = _publish(store, step)
        assert snap.version == store.latest_version()
    assert store.versions() == ["v000003", "v000004"]
    latest = store.latest()
    assert (latest.version, latest.step, latest.count, latest.dim) == ("v000004", 400, 300, 8)
    assert latest.staleness(450) == 50
    np.testing.assert_array_equal(latest.embeddings(), _emb(seed=400))
    np.testing.assert_array_equal(latest.ids(), np.arange(300))
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "LATEST", "v000003", "v000004"]
    # Prune never removes the version LATEST names, even when it is not among the newest.
    (tmp_path / "index" / "LATEST").write_text("v000003\n")
    _publish(store, 500, keep=3)
    (tmp_path / "index" / "LATEST").write_text("v000003\n")
    assert store.prune(keep=1) == ["v000004"]
    assert store.versions() == ["v000003", "v000005"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_dtypes_ids_and_searchers(tmp_path, dtype):
    emb = _emb(2000, 16)
    ids = np.arange(2000, dtype=np.int64)[::-1] * 7
    scann = ScannSearcher.build(emb, ids, ScannSettings(num_threads=1))
    store = IndexStore(tmp_path)
    snap = store.publish(emb, ids=ids, step=7, model_fingerprint="m", corpus_fingerprint="c",
                         dtype=dtype, scann=scann, extra={"corpus_path": "/data/blocks"})
    loaded = store.latest(expected_corpus_fingerprint="c")
    assert loaded.manifest == snap.manifest
    assert loaded.dtype == dtype and loaded.embeddings().dtype.name == dtype
    assert loaded.scann_settings == scann.settings
    assert loaded.manifest["extra"] == {"corpus_path": "/data/blocks"}
    np.testing.assert_array_equal(loaded.ids(), ids)
    np.testing.assert_array_equal(loaded.embeddings().astype(np.float32),
                                  emb.astype(dtype).astype(np.float32))
    queries = _emb(5, 16, seed=9)
    for got, want in zip(loaded.scann_searcher(num_threads=1).search(queries, 10),
                         scann.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    want = base.exact_search(queries, loaded.embeddings(), 10, ids)
    got = loaded.device_searcher(block_size=64).search(queries, 10)
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("corruption, what", [
    ("truncate", "embeddings.npy"),
    ("flip_byte", "ids.npy"),
    ("delete", "embeddings.npy"),
    ("manifest_count", "embeddings.npy"),
    ("manifest_json", "manifest.json"),
    ("manifest_field", "manifest.json:step"),
])
def test_corrupted_snapshot_is_refused(tmp_path, caplog, corruption, what):
    store = IndexStore(tmp_path)
    _publish(store, 1)
    good = _publish(store, 2)
    watcher = SnapshotWatcher(store, expected_corpus_fingerprint="corpus-1")
    assert watcher.poll().version == good.version
    bad = _publish(store, 3).path
    if corruption == "truncate":
        with open(bad / "embeddings.npy", "r+b") as f:
            f.truncate(os.path.getsize(bad / "embeddings.npy") - 10)
    elif corruption == "flip_byte":
        data = bytearray((bad / "ids.npy").read_bytes())
        data[-3] ^= 0xFF
        (bad / "ids.npy").write_bytes(bytes(data))
    elif corruption == "delete":
        (bad / "embeddings.npy").unlink()
    else:
        manifest = json.loads((bad / "manifest.json").read_text())
        if corruption == "manifest_count":
            manifest["count"] = 301
        elif corruption == "manifest_field":
            manifest["step"] = "three"
        text = json.dumps(manifest)
        (bad / "manifest.json").write_text(text[:-5] if corruption == "manifest_json" else text)
    with pytest.raises(SnapshotError) as err:
        store.validate(bad.name)
    assert err.value.what == what and str(bad) in str(err.value)
    with caplog.at_level(logging.WARNING, logger="realm_jax.index.store"):
        assert watcher.poll() is None
        assert watcher.poll() is None
    assert watcher.current.version == good.version
    assert sum("refusing" in r.message for r in caplog.records) == 1  # logged once
    assert str(bad) in caplog.text
    # A restarted trainer falls back to the newest valid snapshot.
    assert SnapshotWatcher(store).poll().version == good.version
    # The next good publish is picked up.
    assert watcher.poll() is None
    assert watcher.poll() is None
    newer = _publish(store, 4)
    assert watcher.poll().version == newer.version


def test_watcher_checks_corpus_fingerprint(tmp_path):
    store = IndexStore(tmp_path)
    _publish(store, 1)
    watcher = SnapshotWatcher(store, expected_corpus_fingerprint="corpus-1")
    assert watcher.poll().step == 1
    store.publish(_emb(), step=2, model_fingerprint="m", corpus_fingerprint="corpus-2")
    assert watcher.poll() is None and watcher.current.step == 1
    with pytest.raises(SnapshotError, match="corpus_fingerprint"):
        store.latest(expected_corpus_fingerprint="corpus-1")


def test_cleanup_of_dead_publishers(tmp_path):
    store = IndexStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    leftovers = [f".tmp-snapshot-aaaa-{dead.pid}-{host}", f".tmp-latest-bbbb-{dead.pid}-{host}",
                 ".trash-cccc-v000009"]
    alive = f".tmp-snapshot-dddd-{os.getpid()}-{host}"
    for name in leftovers[::2] + [alive]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "embeddings.npy").write_bytes(b"partial")
    (tmp_path / leftovers[1]).write_text("v0000")
    _publish(store, 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([alive, "LATEST", "v000001"])


PUBLISHER = textwrap.dedent("""
    import os, sys, types
    # Import the store without realm_jax/__init__ (which may import JAX): startup stays fast.
    package = types.ModuleType("realm_jax")
    package.__path__ = [os.path.join(sys.argv[1], "realm_jax")]
    sys.modules["realm_jax"] = package
    import numpy as np
    from realm_jax.index.store import IndexStore

    root, stage_log, rounds = sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = IndexStore(root, keep=2)
    fd = os.open(stage_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    def stage(name):
        os.write(fd, (name + "\\n").encode())
    stage("started")
    rng = np.random.default_rng(os.getpid())
    for i in range(rounds):
        emb = rng.normal(size=(int(rng.integers(5_000, 30_000)), 32)).astype(np.float16)
        store.publish(emb, step=i, model_fingerprint="m", corpus_fingerprint="c",
                      on_stage=stage)
        stage("published")
""")


def _check_store(store):
    """LATEST names a complete valid snapshot, and so does every version folder."""
    latest = store.latest_version()
    if latest is not None:
        assert latest in store.versions()
    for version in store.versions():
        store.validate(version)


def test_sigkill_during_publish_keeps_latest_valid(tmp_path):
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    root, stage_log = tmp_path / "index", tmp_path / "stages.log"
    store = IndexStore(root)
    rng = random.Random(0)
    stages_hit, start, trials = set(), time.time(), 0
    while trials < 24 or (len(stages_hit) < 4 and time.time() - start < 25):
        stage_log.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(script), REPO, str(root), str(stage_log),
                                 "1000"])
        while not stage_log.exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        stages_hit.add((stage_log.read_text().split() or ["started"])[-1])
        _check_store(store)
        trials += 1
    assert store.latest_version() is not None
    assert len(stages_hit) >= 3, stages_hit  # killed at several different points
    # A restarted publisher finishes the job and clears what the killed ones left behind.
    before = store.latest_version()
    subprocess.run([sys.executable, str(script), REPO, str(root), str(stage_log), "1"],
                   check=True)
    _check_store(store)
    assert int(store.latest_version()[1:]) > int(before[1:])
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
