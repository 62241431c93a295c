"""Data safety and bad input (issue 25): nothing a user owns is deleted, nothing corrupt is
served or republished, nothing hangs, and every expected error is one clear line."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from realm_jax import cli, hf
from realm_jax.data import BlockStore, BlockStoreWriter, load_tokenizer, prepare_corpus
from realm_jax.data.realm_examples import QueryMaker
from realm_jax.index import store as index_store
from realm_jax.index.store import IndexStore, SnapshotError, SnapshotWatcher


@pytest.fixture(scope="module")
def tok(minilm_path):
    return load_tokenizer(minilm_path)


def _jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


DOCS = [{"id": "a", "title": "Alpha", "text": "Alpha was founded in 1901 by Ada Lovelace."},
        {"id": "b", "title": "Beta", "text": "Beta lies north of the river near Paris."}]


def _tree(folder: Path) -> dict[str, bytes]:
    return {os.fspath(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_cli(argv, capsys) -> tuple[int, str]:
    return cli.main(argv), capsys.readouterr().err


# ---------------------------------------------------------------- 1. prepare-corpus --overwrite


def test_overwrite_never_deletes_the_input_or_a_folder_that_is_not_a_store(tmp_path, capsys,
                                                                           minilm_path):
    mydata = tmp_path / "mydata"
    _jsonl(mydata / "docs.jsonl", DOCS)
    (mydata / "notes.txt").write_text("mine")
    before = _tree(mydata)
    # The output folder holds the input: refused, with or without --overwrite.
    code, err = _run_cli(["prepare-corpus", "--input", str(mydata / "docs.jsonl"), "--output",
                          str(mydata), "--tokenizer", minilm_path, "--overwrite",
                          "--no_progress"], capsys)
    assert code == 2 and "holds the input" in err and len(err.strip().splitlines()) == 1
    assert _tree(mydata) == before
    # An existing folder that is not a block store is never replaced.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    code, err = _run_cli(["prepare-corpus", "--input", str(mydata / "docs.jsonl"), "--output",
                          str(other), "--tokenizer", minilm_path, "--overwrite",
                          "--no_progress"], capsys)
    assert code == 2 and "not a block store" in err and str(other) in err
    assert _tree(other) == {"keep.txt": b"keep"}
    with pytest.raises(FileExistsError, match="not a block store"):
        BlockStoreWriter(other, token_dtype=np.uint16, settings={}, overwrite=True)
    assert _tree(other) == {"keep.txt": b"keep"} and _tree(mydata) == before
    # Without --overwrite: one line naming the flag, not the Python argument.
    code, err = _run_cli(["prepare-corpus", "--input", str(mydata / "docs.jsonl"), "--output",
                          str(other), "--tokenizer", minilm_path, "--no_progress"], capsys)
    assert code == 2 and "--overwrite" in err and "overwrite=True" not in err
    assert len(err.strip().splitlines()) == 1
    # A block store is still replaced.
    store = tmp_path / "store"
    for _ in range(2):
        code, err = _run_cli(["prepare-corpus", "--input", str(mydata / "docs.jsonl"),
                              "--output", str(store), "--tokenizer", minilm_path,
                              "--overwrite", "--no_progress"], capsys)
        assert code == 0, err
    assert len(BlockStore.open(store)) == 2


# ---------------------------------------------------------------- 2. no salient span anywhere


def test_a_corpus_without_salient_spans_fails_fast(tmp_path, tok):
    from realm_jax.tasks import realm

    docs = [{"id": str(i), "title": "", "text": "the river runs under the old bridge and on to "
             "the sea."} for i in range(40)]
    store = BlockStore.open(prepare_corpus(_jsonl(tmp_path / "d.jsonl", docs), tmp_path / "s",
                                           tokenizer=tok, progress=False).path)
    maker = QueryMaker.for_store(store, tok)
    with pytest.raises(ValueError) as err:
        maker.require_queries(store, seed=3, sample=16)
    message = str(err.value)
    assert str(store.path) in message and "16 block(s) looked at (of 40)" in message
    assert "DateFinder+CapitalizedPhraseFinder" in message and "no_salient_span" in message
    with pytest.raises(ValueError, match="none of the 0 block"):
        maker.require_queries(store, np.zeros(0, np.int64))
    # The pipeline asks before it starts (it would otherwise skip every block forever).
    with pytest.raises(ValueError, match="no REALM query can be made"):
        realm.query_dataset(store, maker, batch_size=2, seed=0)
    # One block with a span among many is found.
    good = BlockStore.open(prepare_corpus(
        _jsonl(tmp_path / "g.jsonl", docs[:20] + DOCS[:1]), tmp_path / "g", tokenizer=tok,
        progress=False).path)
    maker.require_queries(good, seed=0, sample=512)


# ---------------------------------------------------------------- 3. corruption served or reused


def _emb(n=50, dim=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _publish(store, step, **kwargs):
    kwargs.setdefault("embeddings", _emb(seed=step))
    return store.publish(step=step, model_fingerprint=f"m{step}", corpus_fingerprint="c",
                         **kwargs)


def _flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_reader_verifies_checksums_and_falls_back(tmp_path, caplog):
    root = tmp_path / "index"
    good = _publish(IndexStore(root), 1)
    bad = _publish(IndexStore(root), 2)
    _flip(bad.path / "embeddings.npy")  # same size: only the sha256 sees it
    with caplog.at_level(logging.WARNING):
        # What `checksums=False` callers (ORQA's frozen index, other hosts) used to skip.
        snapshot = IndexStore(root).latest_valid("c", checksums=False)
        assert snapshot.version == good.version
        assert IndexStore(root).load(good.version, checksums=False).version == good.version
        with pytest.raises(SnapshotError, match="embeddings.npy: sha256"):
            IndexStore(root).load(bad.version, checksums=False)
        assert SnapshotWatcher(IndexStore(root)).poll().version == good.version
    assert "embeddings.npy: sha256 does not match" in caplog.text and str(bad.path) in caplog.text


def test_checksums_are_verified_once_per_version_and_file_state(tmp_path, monkeypatch):
    store = IndexStore(tmp_path)
    snap = _publish(store, 1)
    calls = []
    real = index_store._sha256
    monkeypatch.setattr(index_store, "_sha256", lambda p: calls.append(p.name) or real(p))
    for _ in range(3):
        store.validate(snap.version)
    assert sorted(calls) == ["embeddings.npy", "ids.npy"]
    # A rewritten file is verified again (and refused).
    _flip(snap.path / "ids.npy")
    os.utime(snap.path / "ids.npy", ns=(1, 1))
    with pytest.raises(SnapshotError, match="ids.npy: sha256"):
        store.validate(snap.version)
    # What a refresher reuses is checked as it is read, however old the validation.
    fresh = IndexStore(tmp_path)
    snap2 = _publish(fresh, 2)
    np.testing.assert_array_equal(fresh.verified_embeddings(snap2), _emb(seed=2))
    _flip(snap2.path / "embeddings.npy")
    with pytest.raises(SnapshotError, match="embeddings.npy: sha256"):
        fresh.verified_embeddings(snap2)


def test_undecodable_latest_is_a_bad_pointer(tmp_path, caplog):
    store = IndexStore(tmp_path)
    good = _publish(store, 1)
    (tmp_path / "LATEST").write_bytes(b"\xff\xfe\x00v0\x80")
    with pytest.raises(SnapshotError, match="LATEST: not text"):
        store.latest_version()
    with caplog.at_level(logging.WARNING):
        assert store.latest_valid().version == good.version
        assert SnapshotWatcher(store).poll().version == good.version
    assert "LATEST" in caplog.text
    assert store.prune(keep=1) == []  # nothing deleted while the pointer is unreadable
    assert _publish(store, 2).version == "v000002"


# ---------------------------------------------------------------- 4. invalid numbers


def test_token_ids_are_checked_against_the_recorded_vocabulary(tmp_path):
    settings = {"mode": "realm", "tokenizer": {"vocab_size": 100}}
    with BlockStoreWriter(tmp_path / "s", token_dtype=np.uint16, settings=settings) as w:
        w.add(np.arange(5), doc_id="a", title="", text="x", spans=[], doc_index=0)
        w.add(np.array([7, 99]), doc_id="b", title="", text="y", spans=[], doc_index=1)
        w.finish()
    assert len(BlockStore.open(tmp_path / "s")) == 2
    # A store written with ids past its vocabulary is never put in place.
    with pytest.raises(ValueError, match=r"id 100 \(block 1\), outside the vocabulary of 100"):
        with BlockStoreWriter(tmp_path / "t", token_dtype=np.uint16, settings=settings) as w:
            w.add(np.arange(5), doc_id="a", title="", text="x", spans=[], doc_index=0)
            w.add(np.array([3, 100]), doc_id="b", title="", text="y", spans=[], doc_index=1)
            w.finish()
    assert not (tmp_path / "t").exists()
    # A damaged token file is refused when opened, naming the store and the block.
    tokens = np.load(tmp_path / "s" / "tokens.npy", mmap_mode="r+")
    tokens[6] = 4000
    tokens.flush()
    del tokens
    with pytest.raises(ValueError, match=r"corrupt block store .*id 4000 \(block 1\)"):
        BlockStore.open(tmp_path / "s")
    # Stores made before the vocabulary size was recorded open as before.
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["settings"]["tokenizer"]["vocab_size"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert BlockStore.open(tmp_path / "s").tokens(1).tolist() == [7, 4000]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_embeddings_are_never_published(tmp_path, dtype):
    store = IndexStore(tmp_path)
    first = _publish(store, 1)
    emb = _emb(seed=2)
    emb[7, 1], emb[31, 0] = np.nan, np.inf
    ids = np.arange(50, dtype=np.int64) + 1000
    with pytest.raises(ValueError, match=r"2 embedding row\(s\).*rows \[7, 31\], blocks "
                                         r"\[1007, 1031\]"):
        _publish(store, 2, embeddings=emb, ids=ids, dtype=dtype)
    if dtype == "float16":  # finite in float32, infinite once stored in float16
        with pytest.raises(ValueError, match=r"rows \[0, 1, 2\]"), \
                np.errstate(over="ignore"):
            _publish(store, 2, embeddings=np.full((3, 2), 1e6, np.float32), dtype=dtype)
    assert store.latest_version() == first.version and store.versions() == [first.version]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", first.version]


# ---------------------------------------------------------------- 5. clear errors


@pytest.mark.parametrize("error, shown", [
    (FileExistsError(errno.EEXIST, "File exists", "/data/out"), "File exists: '/data/out'"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), "Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/.tmp-1"),
     "disk full writing /data/.tmp-1"),
    (SnapshotError("/w/index/v000001", "ids.npy", "sha256 does not match the manifest"),
     "v000001: ids.npy: sha256"),
    (ValueError("NOT_FOUND: Error opening \"zarr\" driver:\n  checkpoint/7"),
     "NOT_FOUND: Error opening \"zarr\" driver: checkpoint/7"),
    (hf.CheckpointError("/m/model.safetensors: not a readable safetensors file"),
     "model.safetensors"),
])
def test_cli_turns_expected_errors_into_one_line(monkeypatch, capsys, error, shown):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_prepare_corpus", fail)
    argv = ["prepare-corpus", "--input", "x.jsonl", "--output", "o", "--tokenizer", "t"]
    code, err = _run_cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("realm-jax prepare-corpus: error: ") and shown in err
    assert "Traceback" not in err
    code, err = _run_cli(["-v"] + argv, capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].endswith(
        err.strip().splitlines()[-1].split("error: ", 1)[1])


def test_cli_refuses_an_empty_question(capsys, tmp_path):
    code, err = _run_cli(["answer", "--workdir", str(tmp_path), ""], capsys)
    assert code == 2 and "empty question" in err
    code, err = _run_cli(["answer", "--workdir", str(tmp_path), "who?", "  "], capsys)
    assert code == 2 and "empty question" in err


def test_duplicate_document_ids_are_kept_counted_and_warned(tmp_path, tok, caplog):
    docs = DOCS + [dict(DOCS[0], text="Another Alpha, from 1950."), dict(DOCS[0], text="More.")]
    with caplog.at_level(logging.WARNING, logger="realm_jax.data.corpus"):
        result = prepare_corpus(_jsonl(tmp_path / "d.jsonl", docs), tmp_path / "s",
                                tokenizer=tok, progress=False)
    assert result.num_documents == 4
    assert result.manifest["stats"]["duplicate_doc_ids"] == 2
    assert "2 document(s) repeat the id of an earlier one (e.g. 'a')" in caplog.text
    assert prepare_corpus(_jsonl(tmp_path / "u.jsonl", DOCS), tmp_path / "u", tokenizer=tok,
                          progress=False).manifest["stats"]["duplicate_doc_ids"] == 0


def test_tokenizer_folder_without_a_tokenizer_file(tmp_path, minilm_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(Path(minilm_path) / "config.json", folder)  # loads as special tokens only
    with pytest.raises(FileNotFoundError, match=f"{folder} has no tokenizer file"):
        load_tokenizer(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors_names_the_file(tmp_path, minilm_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(minilm_path, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(hf.CheckpointError, match=f"{weights}: not a readable safetensors"):
        hf.load_embedder(folder)


# ---------------------------------------------------------------- 6. one refresher per workdir


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_process_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from realm_jax.durable import LockHeld, ProcessLock

    path = tmp_path / "refresh" / "lock"
    lock = ProcessLock.acquire(path, "refresher")
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(LockHeld, match=f"another refresher holds {path}: pid {os.getpid()} "
                                       f"on host {socket.gethostname()}"):
        ProcessLock.acquire(path, "refresher")
    lock.release()
    assert not path.exists()
    # A lock left by a process that died on this host is taken over.
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with ProcessLock.acquire(path, "refresher") as lock:
        assert json.loads(path.read_text()) == lock.holder
    # Newcomers racing for one stale lock: exactly one takes it.
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    go = tmp_path / "go"
    racer = ("import os, sys, time\n"
             "from realm_jax.durable import LockHeld, ProcessLock\n"
             f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
             "try:\n"
             f"    lock = ProcessLock.acquire({str(path)!r}, 'refresher')\n"
             "except LockHeld:\n"
             "    print('refused', flush=True)\n"
             "else:\n"
             "    print('took', flush=True); time.sleep(2); lock.release()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    racers = [subprocess.Popen([sys.executable, "-c", racer], stdout=subprocess.PIPE,
                               text=True, env=env) for _ in range(4)]
    time.sleep(1.0)
    go.touch()
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert outcomes == ["refused", "refused", "refused", "took"]
    assert not path.exists()
    # Another host's lock is never judged stale.
    path.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere"}))
    with pytest.raises(LockHeld, match="host elsewhere.*delete that file"):
        ProcessLock.acquire(path, "refresher")
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []


# ---------------------------------------------------------------- 7. disk full


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_prepare_keeps_the_previous_store(tmp_path, tok, monkeypatch, capsys,
                                                          minilm_path):
    src = _jsonl(tmp_path / "d.jsonl", DOCS)
    prepare_corpus(src, tmp_path / "s", tokenizer=tok, progress=False)
    before = _tree(tmp_path / "s")
    monkeypatch.setattr(np, "save", _enospc)
    with pytest.raises(OSError) as err:
        prepare_corpus(src, tmp_path / "s", tokenizer=tok, overwrite=True, progress=False)
    assert err.value.errno == errno.ENOSPC and ".s.tmp-" in err.value.filename
    assert _tree(tmp_path / "s") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "s"]
    code, err = _run_cli(["prepare-corpus", "--input", str(src), "--output",
                          str(tmp_path / "s"), "--tokenizer", minilm_path, "--overwrite",
                          "--no_progress"], capsys)
    assert code == 2 and f"disk full writing {tmp_path}/.s.tmp-" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "s"]


def test_disk_full_during_publish_keeps_latest(tmp_path, monkeypatch):
    store = IndexStore(tmp_path)
    first = _publish(store, 1)
    monkeypatch.setattr(index_store, "_write_npy", _enospc)
    with pytest.raises(OSError) as err:
        _publish(store, 2)
    assert err.value.errno == errno.ENOSPC and "/.tmp-snapshot-" in err.value.filename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", first.version]
    assert store.latest().version == first.version
