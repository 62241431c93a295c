"""REALM pre-training end to end on the Wikipedia sample with tiny models: the trainer and
the refresher side by side (the refresher in a thread here; two processes in launch/),
both retrieval modes, checkpoints, resumption, and the input pipeline's determinism."""

import json
import threading

import jax
import numpy as np
import pytest

from realm_jax import config as config_lib
from realm_jax.data.corpus import prepare_corpus
from realm_jax.data.realm_examples import QueryMaker
from realm_jax.data.store import BlockStore
from realm_jax.refresh import Refresher, RefreshSettings
from realm_jax.train import realm, trainer
from realm_jax.train.checkpoints import TrainCheckpoints
from realm_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wiki_sample_path, minilm_path):
    out = tmp_path_factory.mktemp("corpus") / "store"
    prepare_corpus(wiki_sample_path, out, tokenizer=minilm_path, mode="realm", max_tokens=32,
                   max_documents=3, progress=False)
    return str(out)


def _config(corpus, tokenizer, *overrides):
    return config_lib.load_config(
        "tiny_realm", f"data.corpus={corpus}", f"data.tokenizer={tokenizer}",
        "model.encoder.vocab_size=30522", "refresh.poll_seconds=0.1", "train.log_every=1",
        "train.index_wait_seconds=300", *overrides)


def _run(config, workdir):
    """The trainer, with a refresher thread keeping WORKDIR/index up to date."""
    refresher = Refresher(workdir, RefreshSettings.from_config(config), progress=False)
    thread = threading.Thread(target=refresher.run, daemon=True)
    thread.start()
    result = trainer.train(config, workdir)
    thread.join(120)
    assert not thread.is_alive(), "the refresher did not stop after the trainer finished"
    return result


@pytest.mark.parametrize("mode", ["device", "scann"])
def test_trainer_and_refresher_side_by_side(tmp_path, corpus, minilm_path, mode):
    config = _config(corpus, minilm_path, "train.steps=6", "train.checkpoint_every=2",
                     f"retrieval.mode={mode}")
    result = _run(config, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["masked_tokens"] > 0
        assert r["staleness"] >= 0 and r["step_time"] > 0 and r["mfu"] > 0
    assert ckpts.is_finished() and ckpts.latest_step() == 6
    # The refresher followed the trainer to its last checkpoint.
    log = [json.loads(l) for l in (tmp_path / "refresh_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 6
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


def test_resumed_run_continues_where_it_stopped(tmp_path, corpus, minilm_path):
    config = _config(corpus, minilm_path, "train.steps=2", "train.checkpoint_every=2")
    _run(config, tmp_path)
    resumed = _config(corpus, minilm_path, "train.steps=4", "train.checkpoint_every=2")
    result = _run(resumed, tmp_path)
    assert int(result["final_state"].step) == 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert TrainCheckpoints(tmp_path).is_finished()
    # The pipeline position saved at step 4 is where 4 batches from the start lead.
    state, meta = TrainCheckpoints(tmp_path).restore(4)
    store = BlockStore.open(corpus)
    maker = QueryMaker.for_store(store, minilm_path, query_length=24)
    it = iter(realm.query_dataset(store, maker, config.train.batch_size, config.seed))
    for _ in range(4):
        next(it)
    assert meta["data"] == it.get_state()


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
