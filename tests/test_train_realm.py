"""REALM pre-training end to end on the Wikipedia sample with tiny models: the trainer and
the refresher side by side (the refresher in a thread here; two processes in launch/),
both retrieval modes, index swaps and staleness, held-out evaluation, checkpoints,
resumption (parameter-exact), SIGKILL of the refresher and of the trainer, and the input
pipeline's determinism.

The trainer runs here compile the same step (same shapes and config); a persistent
compilation cache, shared with the subprocesses, compiles it once (each compile of the step
takes 20-40 s on a 2-core machine)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from realm_jax import config as config_lib
from realm_jax import sharding
from realm_jax.data.corpus import prepare_corpus, update_corpus
from realm_jax.data.realm_examples import QueryMaker
from realm_jax.data.store import BlockStore
from realm_jax.index.device import device_topk
from realm_jax.index.store import IndexStore
from realm_jax.refresh import Refresher, RefreshSettings, publish_initial_index
from realm_jax.tasks import heldout, realm
from realm_jax.train import trainer
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.train.metrics import read_metrics
from realm_jax.workdir import HELDOUT_BASELINE
from tiny_corpus import train_beside_refresher

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wiki_sample_path, minilm_path):
    out = tmp_path_factory.mktemp("corpus") / "store"
    prepare_corpus(wiki_sample_path, out, tokenizer=minilm_path, mode="realm", max_tokens=32,
                   max_documents=3, progress=False)
    return str(out)


def _overrides(corpus, tokenizer, *overrides):
    return [f"data.corpus={corpus}", f"data.tokenizer={tokenizer}",
            "model.encoder.vocab_size=30522", "refresh.poll_seconds=0.1", "train.log_every=1",
            "train.index_wait_seconds=300", "train.steps=6", "train.checkpoint_every=2",
            *overrides]


def _config(corpus, tokenizer, *overrides):
    return config_lib.load_config("realm:tiny", *_overrides(corpus, tokenizer, *overrides))


@pytest.fixture(scope="module")
def initial_index(tmp_path_factory, corpus, minilm_path):
    """An index folder holding one snapshot (step 0) of the corpus embedded with the
    initial document tower, as the refresher would publish it from the step-0 checkpoint:
    copied into a workdir, it fixes the index of a run (no refresher)."""
    root = tmp_path_factory.mktemp("initial") / "index"
    config = _config(corpus, minilm_path)
    configs, params = realm.build_models(config)
    publish_initial_index(config, configs["doc_tower"], params["doc_tower"], root)
    return root


def _with_index(workdir: Path, index: Path) -> Path:
    shutil.copytree(index, workdir / "index")
    return workdir


def _train_rows(workdir):
    return [r for r in read_metrics(workdir) if "loss" in r]


def _assert_eval(values, step):
    assert values["step"] == step
    assert np.isfinite(values["heldout_loss"]) and values["heldout_loss"] > 0
    assert np.isfinite(values["heldout_retrieval_utility"])
    assert values["heldout_masked_tokens"] > 0 and values["heldout_queries"] == 16


def test_paired_change_by_hand():
    # Three queries (the last one padding, no tokens): 2 and 1 masked tokens.
    before = (np.array([-1.0, 0.5, 0.0]), np.array([2.0, 1.0, 0.0]))
    after = (np.array([0.2, 0.2, 9.0]), np.array([2.0, 1.0, 0.0]))
    change, se = heldout.paired_change(before, after)
    # Differences per query 1.2 and -0.3 over 3 tokens: (1.2 - 0.3) / 3 = 0.3; residuals
    # 1.2 - 2 * 0.3 = 0.6 and -0.3 - 0.3 = -0.6: sqrt(2 / 1 * 0.72) / 3 = 0.4.
    assert change == pytest.approx(0.3) and se == pytest.approx(0.4)
    with pytest.raises(ValueError, match="different tokens"):
        heldout.paired_change(before, (after[0], np.array([1.0, 1.0, 0.0])))


def test_answer_finder_and_answerable_change(tmp_path):
    """A query is answerable when its masked wordpieces occur, whole and in order, in a block
    it may read; the held-out figures are then also given over those queries alone."""
    from types import SimpleNamespace

    from realm_jax import sharding
    from realm_jax.data.realm_examples import MaskedQuery
    from realm_jax.data.store import BlockStoreWriter

    # Blocks (document): 0 (0) [5 6 7], 1 (0) [6 7 9], 2 (1) [70 5], 3 (1) [8].
    with BlockStoreWriter(tmp_path / "s", token_dtype=np.uint16, settings={}) as w:
        for doc, tokens in [(0, [5, 6, 7]), (0, [6, 7, 9]), (1, [70, 5]), (1, [8])]:
            w.add(np.array(tokens), doc_id=str(doc), title="", text="", spans=[], doc_index=doc)
        w.finish()
    store = BlockStore.open(tmp_path / "s")

    def query(block, targets):  # room for 2 masked tokens
        valid = np.arange(2) < len(targets)
        return MaskedQuery(np.zeros(4, np.int32), np.ones(4, np.int32),
                           np.where(valid, [1, 2], 0).astype(np.int32),
                           np.array(targets + [0] * (2 - len(targets)), np.int32), valid,
                           block, int(store.doc_index[block]), "", "", None)

    queries = [query(0, [6, 7]),    # also in block 1 (same document)
               query(0, [5]),       # also in block 2 (another document)
               query(0, [5, 6]),    # only in its own block
               query(3, [7, 9]),    # in block 1 only
               query(2, [70]),      # only in its own block
               query(0, [7, 6])]    # across two blocks, nowhere within one
    assert [realm.AnswerFinder(store)(q) for q in queries] == [
        True, True, False, True, False, False]
    assert [realm.AnswerFinder(store, "document")(q) for q in queries] == [
        False, True, False, True, False, False]
    with pytest.raises(ValueError, match="retrieval.exclude"):
        realm.AnswerFinder(store, "article")

    # The answerable figures come from the same per-query terms as the overall ones; the
    # answer recall from the candidates each evaluation retrieved.
    evaluate = heldout.HeldoutEval(SimpleNamespace(mode="device"), queries[:4],
                                   mesh=sharding.make_mesh((-1, 1, 1), jax.devices()[:1]),
                                   param_shardings=None, finder=realm.AnswerFinder(store))
    assert evaluate.answerable.tolist() == [True, True, False, True]
    utility = iter([np.array([1.0, -2.0, 0.5, 3.0]), np.array([2.0, -2.0, 1.5, 0.0])])
    candidates = iter([
        np.array([[-1, 1, 2], [-1, 3, 2], [-1, 1, 3], [-1, 0, -1]]),   # hits: queries 0, 1
        np.array([[-1, 2, 3], [-1, 0, 3], [-1, 1, 3], [-1, 1, -1]])])  # 1's own block: 3 only
    tokens = np.array([2.0, 1.0, 2.0, 2.0])
    evaluate._metrics = lambda *_: dict(log_prob=np.zeros(4), utility=next(utility),
                                        tokens=tokens, top_prob=np.ones(4),
                                        null_prob=np.zeros(4), cand_ids=next(candidates))
    first, second = evaluate(None, step=0), evaluate(None, step=5)
    assert first["heldout_answerable_queries"] == 3
    assert first["heldout_answerable_retrieval_utility"] == pytest.approx(2 / 5)
    assert second["heldout_answerable_retrieval_utility"] == pytest.approx(0 / 5)
    assert second["heldout_answerable_retrieval_utility_change"] == pytest.approx(-2 / 5)
    assert second["heldout_retrieval_utility_change"] == pytest.approx(-1 / 7)
    assert first["heldout_unanswerable_queries"] == 1
    assert first["heldout_unanswerable_retrieval_utility"] == pytest.approx(0.5 / 2)
    assert second["heldout_unanswerable_retrieval_utility_change"] == pytest.approx(1 / 2)
    assert "heldout_answerable_retrieval_utility_change" not in first
    assert first["heldout_answer_recall"] == pytest.approx(2 / 3)
    assert second["heldout_answer_recall"] == pytest.approx(1 / 3)
    finder = realm.AnswerFinder(store)
    assert finder.in_blocks(queries[0], [-1, 1]) and not finder.in_blocks(queries[0], [0, 2])
    assert not finder.in_blocks(queries[5], [0, 1, 2, 3])   # across two blocks
    assert realm.AnswerFinder(store, "document").in_blocks(queries[3], [2, 1])
    assert not realm.AnswerFinder(store, "document").in_blocks(queries[0], [1])


def test_heldout_eval_in_chunks():
    """Scored `batch_size` queries at a time, the figures are those of one batch: the rows
    come back in order, and the padding of the last chunk counts nowhere."""
    from types import SimpleNamespace

    from realm_jax import sharding
    from realm_jax.data.realm_examples import MaskedQuery

    def query(i):
        return MaskedQuery(np.zeros(4, np.int32), np.ones(4, np.int32), np.array([1, 2], np.int32),
                           np.array([5, 6], np.int32), np.array([True, i % 2 == 0]), i, 0, "",
                           "", None)

    def per_row(params, batch, corpus):  # query i: summed log prob -i and utility i / 10
        block = np.asarray(batch["block_id"], np.float64)
        return dict(log_prob=-block, utility=block / 10,
                    tokens=np.asarray(batch["mask_valid"], np.float64).sum(-1),
                    top_prob=block / 8, null_prob=1 - block / 8,
                    cand_ids=np.stack([-np.ones_like(block), block], -1))

    queries = [query(i) for i in range(7)]
    mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
    results = []
    for size in (3, 7, 100):
        evaluate = heldout.HeldoutEval(SimpleNamespace(mode="device"), queries, mesh=mesh,
                                       param_shardings=None, batch_size=size)
        assert evaluate.chunk == min(size, 7)
        evaluate._metrics = per_row
        results.append(evaluate(None))
    tokens = 4 * 2 + 3                                        # even queries mask two tokens
    expected = {"heldout_loss": 21 / tokens,
                "heldout_retrieval_utility": 2.1 / tokens, "heldout_masked_tokens": tokens,
                "heldout_top_candidate_prob": 21 / 8 / 7, "heldout_queries": 7}
    for values in results:
        assert {k: values[k] for k in expected} == pytest.approx(expected)


def test_heldout_baseline_file(tmp_path, corpus, minilm_path, caplog):
    """A resumed run reads the run's first evaluation back, only when it was measured on
    the same queries; an unreadable or foreign file is ignored with a warning."""
    from types import SimpleNamespace

    from realm_jax import sharding

    store = BlockStore.open(corpus)
    maker = QueryMaker.for_store(store, minilm_path, query_length=24)
    _, heldout_ids = heldout.split_blocks(store, 0.1)
    queries = heldout.heldout_queries(store, maker, heldout_ids, 4, seed=0)
    mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])

    def evaluator(queries, resume=True):
        return heldout.HeldoutEval(SimpleNamespace(mode="device"), queries, mesh=mesh,
                                   param_shardings=None, baseline_file=path, resume=resume)

    path = tmp_path / HELDOUT_BASELINE
    fingerprint = evaluator(queries).queries_fingerprint
    assert evaluator(queries[:3]).queries_fingerprint != fingerprint
    path.write_text(json.dumps(dict(step=0, queries_fingerprint=fingerprint,
                                    query_utility=[0.5, -1.0, 0.0, 2.0],
                                    query_tokens=[1, 2, 0, 1])))
    step, (utility, tokens) = evaluator(queries).baseline
    assert step == 0 and utility.tolist() == [0.5, -1.0, 0.0, 2.0]
    assert tokens.tolist() == [1, 2, 0, 1]
    assert evaluator(queries, resume=False).baseline is None      # a fresh run re-measures
    with caplog.at_level("WARNING"):
        assert evaluator(queries[:3]).baseline is None
        assert "other queries" in caplog.text
        path.write_text("{not json")
        assert evaluator(queries).baseline is None
        assert "unreadable" in caplog.text


def test_heldout_documents_and_queries(corpus, minilm_path):
    held = heldout.heldout_documents(25, 0.1)
    assert np.flatnonzero(held).tolist() == [0, 10, 20]          # every 10th, from the first
    assert heldout.heldout_documents(10, 0.25).sum() == 3          # ceil(10 * 0.25)
    assert not heldout.heldout_documents(5, 0.0).any()
    with pytest.raises(ValueError, match="heldout_fraction"):
        heldout.heldout_documents(5, 1.0)

    store = BlockStore.open(corpus)                                # 3 documents: 0 held out
    train_ids, heldout_ids = heldout.split_blocks(store, 0.1)
    docs = np.asarray(store.doc_index)
    assert set(docs[heldout_ids]) == {0} and 0 not in set(docs[train_ids])
    assert len(train_ids) + len(heldout_ids) == len(store)
    maker = QueryMaker.for_store(store, minilm_path, query_length=24)
    queries = heldout.heldout_queries(store, maker, heldout_ids, 16, seed=0)
    again = heldout.heldout_queries(store, maker, heldout_ids, 16, seed=0)
    assert len(queries) == 16 and len({q.block_id for q in queries}) == 16
    assert [q.block_id for q in queries] == [q.block_id for q in again]
    assert all(q.doc_index == 0 for q in queries)
    # Training batches come from the training documents only.
    it = iter(realm.query_dataset(store, maker, 8, seed=0, block_ids=train_ids))
    for _ in range(3):
        assert 0 not in set(next(it)["doc_index"].tolist())
    # data.answerable_only: only queries the filter accepts; blocks with none are skipped.
    finder = realm.AnswerFinder(store)
    assert 0 < np.mean([finder(q) for q in queries]) < 1      # the filter has work to do
    seen = []
    it = iter(realm.query_dataset(store, maker, 4, seed=0, block_ids=train_ids,
                                  keep=lambda q: seen.append(finder(q)) or seen[-1]))
    batches = [next(it) for _ in range(3)]
    assert False in seen                                       # some were refused
    with pytest.raises(ValueError, match="data.answerable_only"):
        realm.query_dataset(store, maker, 4, seed=0, block_ids=train_ids, keep=lambda q: False)
    for batch in batches:
        for row in range(4):
            valid = batch["mask_valid"][row]
            span = "".join(chr(int(t) + 1) for t in batch["mask_targets"][row][valid])
            others = [b for b in train_ids.tolist() + heldout_ids.tolist()
                      if b != batch["block_id"][row]]
            assert any(span in "".join(map(chr, store.tokens(b).astype(np.int64) + 1))
                       for b in others)
    # Padding rows carry no masked token.
    from realm_jax.data.realm_examples import collate_queries
    padded = heldout.pad_batch(collate_queries(queries[:5]), 8)
    assert padded["input_ids"].shape[0] == 8 and not padded["mask_valid"][5:].any()


@pytest.mark.parametrize("mode", ["device", "scann"])
def test_trainer_and_refresher_side_by_side(tmp_path, corpus, minilm_path, mode):
    # max_index_staleness=2 with a checkpoint every 2 steps: at steps 2 and 4 the trainer
    # waits for the refresher's index of that step's checkpoint, so swaps happen at fixed
    # steps however fast either side runs.
    config = _config(corpus, minilm_path, f"retrieval.mode={mode}", "train.max_index_staleness=2")
    result = train_beside_refresher(config, tmp_path)
    rows = _train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["masked_tokens"] > 0
        assert r["step_time"] > 0 and r["mfu"] > 0
        assert r["staleness"] == r["step"] - r["index_step"] >= 1
    ckpts = TrainCheckpoints(tmp_path)
    assert ckpts.is_finished() and ckpts.latest_step() == 6
    # Snapshots were swapped in, and after each swap the staleness fell back to the steps
    # since the new snapshot's checkpoint.
    assert [(s["step"], s["checkpoint_step"]) for s in result["swaps"]] == [(2, 2), (4, 4)]
    assert [r["staleness"] for r in rows] == [1, 2, 1, 2, 1, 2]
    by_step = {r["step"]: r for r in rows}
    for swap in result["swaps"]:
        after, before = by_step[swap["step"] + 1], by_step[swap["step"]]
        assert after["staleness"] == swap["step"] + 1 - swap["checkpoint_step"]
        assert after["staleness"] < before["staleness"] + 1
    # The refresher followed the trainer to its last checkpoint.
    log = [json.loads(l) for l in (tmp_path / "refresh_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 6
    # Held-out evaluation at the start and at the end, in the result and in the metrics.
    _assert_eval(result["first_eval"], 0)
    _assert_eval(result["last_eval"], 6)
    evals = [r for r in read_metrics(tmp_path) if "heldout_loss" in r]
    assert [r["step"] for r in evals] == [0, 6]
    assert evals[-1]["heldout_loss"] == pytest.approx(result["last_eval"]["heldout_loss"])
    # The end's change since the start, paired over the same queries, with its error.
    assert "heldout_retrieval_utility_change" not in result["first_eval"]
    last = result["last_eval"]
    assert last["heldout_retrieval_utility_change"] == pytest.approx(
        last["heldout_retrieval_utility"] - result["first_eval"]["heldout_retrieval_utility"],
        abs=1e-5)
    assert np.isfinite(last["heldout_retrieval_utility_change_se"])
    assert last["heldout_retrieval_utility_change_se"] > 0
    # Gradients reached all three parts: each moved away from its initialisation.
    _, initial = realm.build_models(config)
    trained = jax.device_get(result["final_state"].params)
    for part in realm.PARTS:
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), initial[part],
                                             trained[part]))
        assert max(moved) > 0, part
    # The doc tower is trained through the re-embedded candidates: its projection moved.
    assert np.abs(initial["doc_tower"]["projection"]["kernel"]
                  - trained["doc_tower"]["projection"]["kernel"]).max() > 0


def test_trainer_follows_a_corpus_update(tmp_path, corpus, minilm_path, initial_index):
    """A run whose corpus is updated mid-training (one document removed, one replaced by a
    shorter text: new block ids that only version 1 has) swaps store version and snapshot
    together at the next step boundary: the device corpus then holds the tokens of version
    1, row for row, the snapshot's embeddings at their block ids, and removed blocks as
    masked rows that no search returns. The refresher (same document tower) embedded only
    the new block. Device mode, the side-by-side test's step (a cache hit in a full run)."""
    store = Path(shutil.copytree(corpus, tmp_path / "store"))
    config = _config(store, minilm_path, "retrieval.mode=device",
                     "train.checkpoint_every=6")  # saves at steps 0 and 3 only
    workdir = _with_index(tmp_path / "w", initial_index)
    with BlockStore.open(store) as v0:
        docs = list(dict.fromkeys(v0.doc_id(i) for i in range(len(v0))))
        gone, replaced = docs[0], docs[1]
        old = [i for i in range(len(v0)) if v0.doc_id(i) in (gone, replaced)]
        keep = next(i for i in old if v0.doc_id(i) == replaced)
        (tmp_path / "add.jsonl").write_text(json.dumps(
            {"id": replaced, "title": v0.title(keep), "text": v0.text(keep)}) + "\n")
        rows_v0 = len(v0)
    run = trainer.Trainer(config, workdir)
    refresher = Refresher(workdir, RefreshSettings.from_config(config), progress=False)
    refreshes = []

    def update_and_refresh():
        update_corpus(store, add=tmp_path / "add.jsonl", remove=[gone])
        refreshes.append(refresher.refresh_once())

    def update(step, params):  # the refresher off the trainer's thread (and mesh)
        thread = threading.Thread(target=update_and_refresh)
        thread.start()
        thread.join()

    run.add_hook(update, name="corpus_update", every=2, at_start=False, at_end=False)
    result = run.run(stop_after=3)
    [refreshed] = refreshes
    assert refreshed.embedded == 1 and refreshed.reused == rows_v0 - len(old)
    [swap] = result["swaps"]
    snap = result["snapshot"]
    assert swap["step"] == 2 and swap["index"] == snap.version and snap.store_version == 1
    assert [r["step"] for r in _train_rows(workdir)] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in _train_rows(workdir))
    _assert_eval(result["last_eval"], 3)  # held-out candidates of version 1

    task = run.task
    v1 = task.store
    assert v1.version == 1 and v1.fingerprint == snap.corpus_fingerprint and len(v1) == rows_v0 + 1
    assert np.flatnonzero(~v1.live).tolist() == old
    # held-out answers are looked up in version 1's blocks
    assert task.evaluator.finder is task.finder and len(task.finder._docs) == len(v1)
    arrays = jax.device_get(task.corpus.arrays())
    n = len(v1)
    tokens, lengths = v1.tokens_batch(np.arange(n), max_length=config.retrieval.block_length)
    np.testing.assert_array_equal(arrays["tokens"][:n], tokens)
    np.testing.assert_array_equal(arrays["lengths"][:n], lengths)
    np.testing.assert_array_equal(arrays["doc_index"][:n], v1.doc_index)
    assert (arrays["doc_index"][old] == -1).all() and (arrays["doc_index"][n:] == -1).all()
    np.testing.assert_array_equal(arrays["embeddings"][snap.ids()], snap.embeddings())
    assert not arrays["embeddings"][old].any()
    # The rows of version 0 leave room for the new block: the step compiled for version 0
    # serves version 1.
    rows = arrays["embeddings"].shape[0]
    assert rows == realm.device_corpus_shapes(
        rows_v0, snap.dim, snap.dtype, config.retrieval.block_length, run.mesh,
        config.retrieval.search_block_size)["embeddings"].shape[0]
    assert [realm.corpus_rows(n) for n in (1, 16, 17, 1064, 1065, 1088, 1089)] == [
        1, 16, 17, 1088, 1088, 1088, 1152]
    # The whole corpus searched: every live block comes back, no removed one, no padding.
    queries = np.asarray(snap.embeddings()[:4], np.float32)
    with sharding.activate(run.mesh, run.rules):
        _, got = jax.jit(device_topk, static_argnames=("k", "block_size"))(
            queries, task.corpus.embeddings, k=rows, block_size=task.corpus.block_size,
            row_valid=realm.corpus_row_valid(task.corpus.arrays()))
    got = np.asarray(got)
    live = v1.live_ids().tolist()
    assert all(sorted(r[r >= 0].tolist()) == live for r in got)


def test_resumed_run_matches_an_uninterrupted_run(tmp_path, corpus, minilm_path, initial_index):
    """A run stopped at step 3 and resumed reaches step 6 with the parameters of a run that
    went straight to 6. One index for both (published once; no refresher): training goes
    on without a refresher, the staleness growing. (Checkpoints at 0 and 6 only, and at the
    stop: each save costs seconds with 8 emulated devices.) In scann mode the queries are
    embedded with the query tower of the index's checkpoint (step 0): it is kept past
    keep_checkpoints=1, so the resumed run embeds them as the uninterrupted one does."""
    config = _config(corpus, minilm_path, "train.checkpoint_every=6", "retrieval.mode=scann",
                     "train.keep_checkpoints=1")
    straight_dir = _with_index(tmp_path / "straight", initial_index)
    straight = trainer.train(config, straight_dir)

    resumed_dir = _with_index(tmp_path / "resumed", initial_index)
    stopped = trainer.train(config, resumed_dir, stop_after=3)
    ckpts = TrainCheckpoints(resumed_dir)
    assert int(stopped["final_state"].step) == 3 and ckpts.latest_step() == 3
    assert not ckpts.is_finished()
    resumed = trainer.train(config, resumed_dir)
    assert int(resumed["final_state"].step) == 6 and ckpts.is_finished()
    assert ckpts.all_steps() == [0, 6]  # step 0 pinned: its query tower embeds the queries
    assert [r["step"] for r in _train_rows(resumed_dir)] == [1, 2, 3, 4, 5, 6]
    assert resumed["first_eval"]["step"] == 3

    np.testing.assert_allclose(_train_rows(resumed_dir)[-1]["loss"],
                               _train_rows(straight_dir)[-1]["loss"], rtol=1e-5)
    a, b = (jax.device_get(r["final_state"].params) for r in (straight, resumed))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    assert resumed["last_eval"]["heldout_loss"] == pytest.approx(
        straight["last_eval"]["heldout_loss"], rel=1e-5)
    # The resumed run measures the held-out change from step 0's evaluation, kept in the
    # workdir, as the uninterrupted run does.
    for values in (resumed["first_eval"], resumed["last_eval"], straight["last_eval"]):
        assert values["heldout_baseline_step"] == 0
    assert resumed["first_eval"]["heldout_retrieval_utility_change"] == pytest.approx(
        stopped["last_eval"]["heldout_retrieval_utility_change"], abs=1e-5)
    assert resumed["last_eval"]["heldout_retrieval_utility_change"] == pytest.approx(
        straight["last_eval"]["heldout_retrieval_utility_change"], abs=1e-5)
    # No new index came: the staleness is the step (the index is of step 0's checkpoint).
    assert [r["staleness"] for r in _train_rows(straight_dir)] == [1, 2, 3, 4, 5, 6]
    assert straight["swaps"] == []
    # The pipeline position saved at step 6 is where 6 batches of training blocks lead.
    _, meta = ckpts.restore(6)
    store = BlockStore.open(corpus)
    maker = QueryMaker.for_store(store, minilm_path, query_length=24)
    train_ids, _ = heldout.split_blocks(store, config.data.heldout_fraction)
    it = iter(realm.query_dataset(store, maker, config.train.batch_size, config.seed,
                                  block_ids=train_ids))
    for _ in range(6):
        next(it)
    assert meta["data"] == it.get_state()


def _wait_for(condition, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process {p.args[3]} exited with {p.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_refresher_then_trainer_and_resume(tmp_path, corpus, minilm_path,
                                                   compilation_cache):
    """`realm-jax train` and `realm-jax refresh` as two processes. The refresher is killed
    (SIGKILL) once it has published the first index: training goes on with that index.
    The trainer is killed once it has saved a checkpoint beyond step 0; restarted, it
    resumes from its last complete checkpoint and finishes."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    flags = ["--workdir", str(tmp_path), "--config", f"{REPO / 'configs' / 'realm.py'}:tiny"] + [
        f"--config.{o}" for o in _overrides(corpus, minilm_path)]
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(command, name):
        out = open(logs / name, "w")
        return subprocess.Popen([sys.executable, "-m", "realm_jax.cli", command, *flags],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    index = IndexStore(tmp_path / "index")
    ckpts = TrainCheckpoints(tmp_path)
    train_proc = start("train", "train1.log")
    refresh_proc = start("refresh", "refresh.log")
    try:
        _wait_for(lambda: index.latest_version() is not None, 240, "the first index",
                  [train_proc, refresh_proc])
        refresh_proc.send_signal(signal.SIGKILL)
        assert refresh_proc.wait() == -signal.SIGKILL
        _wait_for(lambda: any(s >= 2 for s in ckpts.all_steps()), 240,
                  "a checkpoint after the refresher died", [train_proc])
        train_proc.send_signal(signal.SIGKILL)
        assert train_proc.wait() == -signal.SIGKILL
    finally:
        for p in (train_proc, refresh_proc):
            if p.poll() is None:
                p.kill()
                p.wait()
    killed_at = ckpts.latest_step()
    assert 2 <= killed_at < 6 and not ckpts.is_finished(), (
        f"the trainer got to step {killed_at} before it was killed")
    assert index.versions() == [index.latest_version()]  # nothing published after the kill

    restarted = subprocess.run([sys.executable, "-m", "realm_jax.cli", "train", *flags],
                               capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output[-3000:]
    assert f"at step {killed_at}" in output and "resumed" in output, output[-3000:]
    assert ckpts.is_finished() and ckpts.latest_step() == 6
    rows = _train_rows(tmp_path)
    assert rows[-1]["step"] == 6 and np.isfinite(rows[-1]["loss"])
    resumed_steps = [r["step"] for r in rows if r["step"] > killed_at]
    assert resumed_steps[-(6 - killed_at):] == list(range(killed_at + 1, 7))
    # One index all along (of step 0's checkpoint): the staleness is the step.
    assert all(r["staleness"] == r["step"] and r["index_step"] == 0 for r in rows)


def test_query_pipeline_is_deterministic_and_resumable(corpus, minilm_path):
    store = BlockStore.open(corpus)
    maker = QueryMaker.for_store(store, minilm_path, query_length=24)
    ds = realm.query_dataset(store, maker, 4, seed=3)
    a = iter(ds)
    first = [next(a) for _ in range(2)]
    state = a.get_state()
    rest = [next(a) for _ in range(2)]
    b = iter(ds)
    b.set_state(state)
    again = [next(b) for _ in range(2)]
    for x, y in zip(rest, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = iter(realm.query_dataset(store, maker, 4, seed=3))
    np.testing.assert_array_equal(next(c)["input_ids"], first[0]["input_ids"])
    assert first[0]["input_ids"].shape == (4, 24)
    # Two hosts each take their half of every global batch.
    halves = [next(iter(realm.query_dataset(store, maker, 4, seed=3, process_index=i,
                                            process_count=2))) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["input_ids"] for h in halves]),
                                  first[0]["input_ids"])


def test_resume_with_another_model_is_refused(tmp_path, corpus, minilm_path, initial_index):
    """A workdir resumed with a model config that differs from its model.json is refused
    with one line naming the field, nothing written; a difference listed in
    train.allow_model_changes resumes. The reader's predictions come with their top tokens."""
    from realm_jax.workdir import ModelMismatch

    workdir = _with_index(tmp_path / "run", initial_index)
    config = _config(corpus, minilm_path, "train.eval_queries=0")
    started = trainer.train(config, workdir, stop_after=0)
    model_json = (workdir / "model.json").read_text()
    with pytest.raises(ModelMismatch, match=r"query_tower\.encoder\.activation \('gelu' -> 'relu'\)"):
        trainer.train(_config(corpus, minilm_path, "train.eval_queries=0",
                              "model.encoder.activation=relu"), workdir, stop_after=0)
    assert (workdir / "model.json").read_text() == model_json
    assert TrainCheckpoints(workdir).all_steps() == [0]
    with pytest.raises(ModelMismatch, match="remat"):
        trainer.train(_config(corpus, minilm_path, "train.eval_queries=0",
                              "model.encoder.remat=True"), workdir, stop_after=0)
    trainer.train(_config(corpus, minilm_path, "train.eval_queries=0", "model.encoder.remat=True",
                          "train.allow_model_changes=('remat',)"), workdir, stop_after=0)
    assert '"remat": true' in (workdir / "model.json").read_text()

    rows = realm.predict_examples(config, workdir, started["final_state"].params, num=3)
    assert len(rows) == 3
    for row in rows:
        assert len(row["targets"]) == len(row["top"]) >= 1
        for top in row["top"]:
            probs = [p for _, p in top]
            assert len(top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
        assert row["retrieved"][0][0] == "(null document)"
        assert sum(p for _, p in row["retrieved"]) == pytest.approx(1.0, abs=1e-5)


def test_resume_sets_an_unreadable_checkpoint_aside(tmp_path, corpus, minilm_path,
                                                    initial_index, caplog):
    """The newest checkpoint's files are damaged: a resumed run warns, renames that step's
    folder aside (nothing deleted), resumes from the step before and reaches the parameters
    the first run had."""
    import logging

    workdir = _with_index(tmp_path / "run", initial_index)
    config = _config(corpus, minilm_path, "train.eval_queries=0")
    first = trainer.train(config, workdir, stop_after=2)
    assert TrainCheckpoints(workdir).all_steps() == [0, 2]
    from tiny_corpus import damage_checkpoint
    damage_checkpoint(workdir / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="realm_jax.train.trainer"):
        again = trainer.train(config, workdir, stop_after=2)
    assert "set aside as" in caplog.text and (workdir / "checkpoints" / "2.unreadable").is_dir()
    assert TrainCheckpoints(workdir).all_steps() == [0, 2] and int(again["final_state"].step) == 2
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 jax.device_get(first["final_state"].params),
                 jax.device_get(again["final_state"].params))
