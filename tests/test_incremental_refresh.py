"""Incremental refresh after `corpus update`: only new blocks are embedded (counted), the
rest reused by id, removed blocks never returned; snapshots name their store version, and a
snapshot of a pruned version is refused."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from realm_jax.data import BlockStore, prepare_corpus
from realm_jax.data.corpus import update_corpus
from realm_jax.data.store import prune_versions, store_versions
from realm_jax.index import embed_corpus as ec
from realm_jax.index.scann_searcher import ScannSettings
from realm_jax.index.store import IndexStore, SnapshotError
from realm_jax.refresh import Refresher, RefreshSettings
from realm_jax.workdir import Workdir, corpus_check
from test_refresh import make_workdir, step_params
from tiny_corpus import TOWER, random_tower, write_corpus


@pytest.fixture(scope="module")
def base_params():
    return random_tower(0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, minilm_path):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder / "docs.jsonl", 12, max_passages=4, seed=5)
    prepare_corpus(folder / "docs.jsonl", folder / "store", tokenizer=minilm_path, mode="dpr",
                   passage_words=12, progress=False)
    return folder / "store"


class CountingEmbedder:
    """A CorpusEmbedder that records the block ids it embeds."""

    def __init__(self, inner):
        self.inner, self.ids = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_blocks(self, params, rows, ids, progress=None):
        self.ids.extend(np.asarray(ids).tolist())
        return self.inner.embed_blocks(params, rows, ids, progress)


@pytest.fixture(scope="module")
def embedder():
    return CountingEmbedder(ec.CorpusEmbedder(TOWER, batch_size=16, dtype="float32"))


def _refresher(workdir, store, embedder, minilm_path, keep=3) -> Refresher:
    settings = RefreshSettings(corpus=os.fspath(store), tokenizer=minilm_path, batch_size=16,
                               dtype="float32", poll_seconds=0.0, keep_snapshots=keep,
                               scann=ScannSettings(num_threads=1))
    return Refresher(workdir, settings, embedder_factory=lambda config: embedder,
                     progress=False)


def _reference(store: BlockStore, embedder, params, minilm_path) -> np.ndarray:
    rows = ec.RowBuilder.for_store(store, minilm_path, max_length=128)
    return embedder.inner.embed_blocks(embedder.inner.place(params), rows, store.live_ids())


def test_incremental_refresh_embeds_only_new_blocks(tmp_path, corpus, base_params, embedder,
                                                     minilm_path):
    store = shutil.copytree(corpus, tmp_path / "store")
    make_workdir(tmp_path / "w", base_params, [6])
    doc_tower = step_params(base_params, 6)["doc_tower"]
    embedder.ids.clear()
    [first] = _refresher(tmp_path / "w", store, embedder, minilm_path).run(once=True)
    with BlockStore.open(store) as v0:
        assert first.embedded == len(v0) and sorted(embedder.ids) == list(range(len(v0)))
        removed_ids = [i for i in range(len(v0)) if v0.doc_id(i) in ("d2", "d4")]
    index = IndexStore(tmp_path / "w" / "index")
    old = index.latest()
    assert old.store_version == 0 and old.manifest["extra"]["reused_blocks"] == 0

    (tmp_path / "add.jsonl").write_text(
        json.dumps({"id": "d4", "title": "Four", "text": "river " * 20}) + "\n"
        + json.dumps({"id": "n1", "title": "New", "text": "castle " * 30}) + "\n")
    update = update_corpus(store, add=tmp_path / "add.jsonl", remove=["d2"])
    embedder.ids.clear()
    [second] = _refresher(tmp_path / "w", store, embedder, minilm_path).run(once=True)
    with BlockStore.open(store) as v1:
        new_ids = list(range(len(v0), len(v1)))
        assert len(new_ids) == update.blocks["added"] + update.blocks["replaced_new"] == 5
        assert sorted(embedder.ids) == new_ids  # only the new blocks were embedded
        assert second.embedded == 5 and second.reused == len(v0) - len(removed_ids)
        snap = index.latest()
        assert snap.store_version == 1 and snap.corpus_fingerprint == v1.fingerprint
        assert snap.manifest["extra"]["embedded_blocks"] == 5
        assert snap.manifest["extra"]["reused_blocks"] == second.reused
        assert np.array_equal(snap.ids(), v1.live_ids())
        assert not set(removed_ids) & set(snap.ids().tolist())
        by_id = snap.block_embeddings()  # (RAG gathers embeddings by block id)
        assert np.array_equal(by_id[snap.ids()], snap.embeddings())
        assert not by_id[removed_ids].any()
        # what a full embedding of version 1 gives
        want = _reference(v1, embedder, doc_tower, minilm_path)
        np.testing.assert_allclose(snap.embeddings(), want, rtol=1e-4, atol=1e-5)
        # no search returns a removed block, even for queries equal to its old embedding
        queries = np.asarray(old.embeddings()[np.isin(old.ids(), removed_ids)], np.float32)
        for searcher in (snap.numpy_searcher(), snap.scann_searcher(), snap.device_searcher()):
            _, got = searcher.search(queries, snap.count)
            assert not set(np.asarray(got).ravel().tolist()) & set(removed_ids)
            assert set(np.asarray(got).ravel().tolist()) <= set(v1.live_ids().tolist())
    # nothing changed: nothing to do
    assert _refresher(tmp_path / "w", store, embedder, minilm_path).refresh_once() is None


def test_snapshots_follow_store_versions_and_pruned_ones_are_refused(
        tmp_path, corpus, base_params, embedder, minilm_path):
    store = shutil.copytree(corpus, tmp_path / "store")
    make_workdir(tmp_path / "w", base_params, [6])
    refresher = _refresher(tmp_path / "w", store, embedder, minilm_path, keep=2)
    refresher.run(once=True)
    index = IndexStore(tmp_path / "w" / "index")
    for version, doc in ((1, "d1"), (2, "d3"), (3, "d5")):
        update_corpus(store, remove=[doc])
        assert refresher.refresh_once().reused > 0  # the long-running refresher follows
        assert index.latest().store_version == version
        if version == 2:
            of_v1 = index.load(index.versions()[0])
            assert of_v1.store_version == 1 and store_versions(store) == [0, 1, 2]
    # snapshots of store versions 2 and 3 are kept: version 1, named by none, was pruned
    assert [index.load(v).store_version for v in index.versions()] == [2, 3]
    assert store_versions(store) == [0, 2, 3]

    # a reader holding another version reads a snapshot's tokens from the snapshot's own
    workdir = Workdir(tmp_path / "w")
    with BlockStore.open(store) as newest:
        snap = workdir.wait_for_snapshot(workdir.index_watcher(newest), 0)
        assert snap.store_version == 3 and workdir.snapshot_store(snap, newest) is newest
        with BlockStore.open(store, version=0) as v0:
            older = workdir.snapshot_store(snap, v0)
            assert older.version == 3 and older.fingerprint == snap.corpus_fingerprint
        # a snapshot naming a pruned store version: refused, naming the version
        with pytest.raises(SnapshotError, match=r"refusing it: .*version 1 is not there"):
            workdir.snapshot_store(of_v1, newest)

    # the store version of an older snapshot pruned by hand: that snapshot is refused
    older = index.load(index.versions()[0])
    assert prune_versions(store) == [2]
    with pytest.raises(SnapshotError, match=r"corpus version that is gone.*version 2 is not"):
        index.validate(older.version, corpus_check(store))
    watcher = workdir.index_watcher(BlockStore.open(store, version=0))
    assert watcher.poll().store_version == 3


def test_whole_corpus_swap_then_refresh(tmp_path, corpus, base_params, embedder, minilm_path,
                                        capsys):
    """`corpus update --replace_all NEW`: NEW is the whole corpus (two documents dropped, one
    changed, one new, the rest as they were): one version, unchanged documents keep their
    block ids, and the refresher (same tower) embeds only the new blocks into a snapshot
    whose searches never return a dropped document."""
    from realm_jax import cli

    store = shutil.copytree(corpus, tmp_path / "store")
    make_workdir(tmp_path / "w", base_params, [6])
    refresher = _refresher(tmp_path / "w", store, embedder, minilm_path)
    refresher.run(once=True)
    docs = [json.loads(line) for line in (corpus.parent / "docs.jsonl").read_text().splitlines()]
    new = [d for d in docs if d["id"] not in ("d0", "d1")]
    new[0] = dict(new[0], text="harbour " * 15)
    new.append({"id": "n1", "title": "New", "text": "lighthouse " * 10})
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(d) + "\n" for d in new))
    assert cli.main(["corpus", "update", "--store", str(store), "--replace_all",
                     str(tmp_path / "new.jsonl"), "--remove", str(tmp_path / "x")]) == 2
    assert "--replace_all takes the whole new corpus" in capsys.readouterr().err
    assert cli.main(["corpus", "update", "--store", str(store), "--replace-all",
                     str(tmp_path / "new.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "version 0 -> 1" in out
    assert f"documents: 1 added, 2 removed, 1 replaced, {len(docs) - 3} unchanged" in out
    with BlockStore.open(store, version=0) as v0, BlockStore.open(store) as v1:
        dropped = [i for i in range(len(v0)) if v0.doc_id(i) in ("d0", "d1", new[0]["id"])]
        kept = [i for i in range(len(v0)) if i not in dropped]
        assert np.flatnonzero(~v1.live).tolist() == dropped
        assert all(np.array_equal(v0.tokens(i), v1.tokens(i)) for i in kept)
        assert sorted({v1.doc_id(i) for i in v1.live_ids().tolist()}) == sorted(
            d["id"] for d in new)
        embedder.ids.clear()
        [result] = refresher.run(once=True)
        assert sorted(embedder.ids) == list(range(len(v0), len(v1)))
        assert result.reused == len(kept)
        snap = IndexStore(tmp_path / "w" / "index").latest()
        assert snap.store_version == 1 and np.array_equal(snap.ids(), v1.live_ids())
        queries = np.asarray(snap.embeddings(), np.float32)
        _, got = snap.numpy_searcher().search(queries, snap.count)
        assert not set(got.ravel().tolist()) & set(dropped)
