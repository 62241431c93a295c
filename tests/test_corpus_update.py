"""Block store versions (`realm-jax corpus update`): counts, stable block ids, old versions,
pruning, and atomicity under SIGKILL at random moments."""

import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from realm_jax import cli
from realm_jax.data.corpus import prepare_corpus, update_corpus
from realm_jax.data.store import BlockStore, prune_versions, store_versions
from tiny_corpus import write_corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, minilm_path):
    """20 documents d0..d19 as 12-word DPR passages (version 0)."""
    folder = tmp_path_factory.mktemp("base")
    write_corpus(folder / "corpus.jsonl", 20, seed=3)
    prepare_corpus(folder / "corpus.jsonl", folder / "store", tokenizer=minilm_path,
                   mode="dpr", passage_words=12, progress=False)
    return folder / "store"


def _copy(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "store"))


def _blocks_of(store: BlockStore, doc_id: str) -> list[int]:
    return [i for i in store.live_ids().tolist() if store.doc_id(i) == doc_id]


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_update_counts_and_stable_ids(base_store, tmp_path, capsys):
    store = _copy(base_store, tmp_path)
    with BlockStore.open(store) as v0:
        old_d3, old_d7 = _blocks_of(v0, "d3"), _blocks_of(v0, "d7")
        d5 = json.loads((base_store.parent / "corpus.jsonl").read_text().splitlines()[5])
        n0, live0 = len(v0), v0.live_ids()
    adds = _write_jsonl(tmp_path / "add.jsonl", [
        {"id": "d3", "title": "Changed", "text": "one two three four five six seven"},
        {"id": "new", "title": "New", "text": "eight nine ten"},
        d5])  # identical to the stored d5: unchanged
    (tmp_path / "rm.txt").write_text("d7\n\nabsent\n")
    assert cli.main(["corpus", "update", "--store", str(store), "--add", str(adds),
                     "--remove", str(tmp_path / "rm.txt")]) == 0
    out = capsys.readouterr().out
    assert "version 0 -> 1" in out
    assert "documents: 1 added, 1 removed, 1 replaced, 18 unchanged" in out
    assert (f"blocks: 1 added, {len(old_d7)} removed, {len(old_d3)} replaced by 1, "
            f"{len(live0) - len(old_d3) - len(old_d7)} unchanged") in out
    assert "'absent'" in out
    assert store_versions(store) == [0, 1]
    with BlockStore.open(store) as v1, BlockStore.open(store, version=0) as v0:
        assert v1.version == 1 and v0.version == 0 and v1.root == store
        assert len(v1) == n0 + 2  # replaced d3 and new: appended after the last row
        assert v1.doc_id(n0) == "d3" and v1.text(n0) == "one two three four five six seven"
        assert v1.doc_id(n0 + 1) == "new"
        gone = set(old_d3) | set(old_d7)
        assert set(np.flatnonzero(~v1.live).tolist()) == gone
        for i in gone:
            assert len(v1.tokens(i)) == 0 and v1.doc_index[i] == -1 and v1.text(i) == ""
        for i in live0.tolist():  # unchanged blocks: same id, same tokens and record
            if i not in gone:
                assert np.array_equal(v0.tokens(i), v1.tokens(i))
                assert v0.record(i).text == v1.record(i).text
                assert v0.doc_index[i] == v1.doc_index[i]
        assert v1.doc_index[n0] == v0.doc_index[old_d3[0]]  # a replaced document's ordinal
        assert v1.doc_index[n0 + 1] == 20
        assert v1.manifest["num_documents"] == 20  # 20 - d7 + new
        assert v1.fingerprint != v0.fingerprint


def test_no_change_writes_no_version_and_old_stores_open(base_store, tmp_path):
    store = _copy(base_store, tmp_path)
    result = update_corpus(store, remove=["absent"])
    assert not result.changed and store_versions(store) == [0]
    with BlockStore.open(store) as s, BlockStore(store) as direct:
        assert s.version == 0 and s.fingerprint == direct.fingerprint
        assert s.live.all()


def test_versions_open_prune_and_refuse(base_store, tmp_path):
    store = _copy(base_store, tmp_path)
    for doc in ("d1", "d2", "d4"):
        update_corpus(store, remove=[doc])
    assert store_versions(store) == [0, 1, 2, 3]
    with BlockStore.open(store, version=2) as v2:
        assert not _blocks_of(v2, "d2") and _blocks_of(v2, "d4")
    assert prune_versions(store, keep={2}) == [1]
    assert store_versions(store) == [0, 2, 3]
    with pytest.raises(FileNotFoundError, match=r"version 1 is not there.*\[0, 2, 3\]"):
        BlockStore.open(store, version=1)
    assert prune_versions(store) == [2]  # never 0 nor the newest
    assert store_versions(store) == [0, 3]


_KILLED = textwrap.dedent("""
    import sys
    from realm_jax.data.corpus import update_corpus
    print("start", flush=True)
    update_corpus(sys.argv[1], remove=sys.argv[2:])
    print("done", flush=True)
""")


def test_sigkill_leaves_one_version_or_the_other(tmp_path, minilm_path):
    """A store large enough that writing a version takes a while; updates killed at random
    moments leave the store at version 0 or at a complete version 1, never a mix."""
    source = tmp_path / "big"
    source.mkdir()
    write_corpus(source / "c.jsonl", 1500, seed=1)
    prepare_corpus(source / "c.jsonl", source / "store", tokenizer=minilm_path, mode="dpr",
                   passage_words=12, progress=False)
    removed = [f"d{i}" for i in range(0, 1500, 7)]
    with BlockStore.open(source / "store") as v0:
        want_live = np.array([v0.doc_id(i) not in set(removed) for i in range(len(v0))])
        count, v0_fingerprint = len(v0), v0.fingerprint
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    rng = random.Random(0)
    seen, duration = set(), None
    for trial in range(8):
        store = Path(shutil.copytree(source / "store", tmp_path / f"s{trial}"))
        proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(store), *removed],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "start"
        t0 = time.perf_counter()
        if duration is None:  # the first run completes: how long an update takes
            assert proc.wait(timeout=120) == 0
            duration = time.perf_counter() - t0
        else:
            time.sleep(rng.uniform(0, duration * 1.1))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with BlockStore.open(store) as s:
            seen.add(s.version)
            if s.version == 0:
                assert s.fingerprint == v0_fingerprint and s.live.all()
            else:
                assert s.version == 1 and len(s) == count
                assert np.array_equal(s.live, want_live)
        # the next update works: a dead updater's lock and leftovers are cleared
        result = update_corpus(store, remove=["d1"])
        assert result.version == s.version + 1
        assert not [p for p in (store / "versions").iterdir() if ".tmp-" in p.name]
    assert 0 in seen and 1 in seen
