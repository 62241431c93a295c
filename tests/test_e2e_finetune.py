"""End-to-end retriever training in ORQA fine-tuning (model.train_doc_tower,
retrieval.strategy): the beam scored by the live document tower (loss and gradients against
logits built by hand, sharded on 8 emulated devices equal to one device), "rerank"'s beam
against a numpy re-ranking, the config refusals, the refresher's `refresh.min_overlap`
decision, a trainer and refresher side by side ("refresh": swaps, staleness and drift
logged, the document tower trained) and exactly resumed "rerank" and "refresh" runs."""

import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import config as config_lib
from realm_jax import sharding
from realm_jax.objectives.orqa import orqa_loss
from test_orqa import (FAST, SPECIAL, _numpy_params, _orqa_config,  # noqa: F401 (fixtures)
                       minilm_1layer, wiki_store)
from tiny_corpus import train_beside_refresher

pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py

B, Q, C, R, K, N, NUM_VALID, P = 8, 12, 10, 6, 3, 64, 61, 16


@pytest.fixture(scope="module")
def tiny():
    """Three one-layer parts (query tower, reader, document tower), random, and a synthetic
    corpus and batch."""
    from realm_jax.models import EmbedderConfig, SpanReaderConfig
    from realm_jax.objectives import orqa

    c = config_lib.load_config("orqa:tiny", "model.encoder.num_layers=1")
    enc = config_lib.encoder_config(c.model.encoder)
    tower = EmbedderConfig(enc, pooling="pooler", projection_dim=P, projection_layer_norm=True)
    configs = {"query_tower": tower, "doc_tower": tower,
               "reader": SpanReaderConfig(enc.replace(add_pooler=False), span_hidden_size=32)}
    params = {part: _numpy_params(cfg, i) for i, (part, cfg) in enumerate(configs.items())}
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, C + 1, N).astype(np.int32)
    corpus = {"embeddings": rng.normal(size=(N, P)).astype(np.float32), "lengths": lengths,
              "tokens": np.where(np.arange(C) < lengths[:, None], rng.integers(4, 128, (N, C)),
                                 0).astype(np.int32)}
    n_q = rng.integers(3, Q + 1, B)
    ids = np.where(np.arange(Q) < n_q[:, None], rng.integers(4, 128, (B, Q)), 0)
    ids[:, 0] = SPECIAL.cls
    ids[np.arange(B), n_q - 1] = SPECIAL.sep
    beam = np.stack([rng.permutation(NUM_VALID)[:R] for _ in range(B)]).astype(np.int32)
    beam[1, -2:] = -1
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": (ids != 0).astype(np.int32),
             "beam_ids": beam, "retrieval_correct": rng.random((B, R)) < 0.4,
             "span_correct": rng.random((B, K, orqa.num_spans(Q + C, 10))) < 0.02}
    return configs, params, corpus, batch


def _model(configs, strategy, over_retrieve=0):
    from realm_jax.tasks.orqa import OrqaModel
    return OrqaModel(configs, SPECIAL, beam_size=R, num_read=K, score_scale=2.0,
                     num_valid=NUM_VALID, block_size=8, strategy=strategy,
                     over_retrieve=over_retrieve)


def _shardings(model, mesh):
    from realm_jax.index.device import corpus_sharding
    rules = sharding.DEFAULT_RULES
    rows = NamedSharding(mesh, PartitionSpec(corpus_sharding(mesh, rules).spec[0]))
    return (sharding.part_shardings(model.configs, mesh, rules),
            NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), rows)


def _run(fn, model, mesh, params, batch, corpus):
    p_sh, b_sh, c_sh = _shardings(model, mesh)
    f = jax.jit(fn, in_shardings=(p_sh, b_sh, c_sh),
                out_shardings=NamedSharding(mesh, PartitionSpec()))
    args = (sharding.place(params, p_sh), {k: jax.device_put(v, b_sh) for k, v in batch.items()},
            {k: jax.device_put(v, c_sh) for k, v in corpus.items()})
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        return jax.device_get(f.lower(*args).compile(FAST)(*args))


def _doc_embeddings(configs, params, corpus, rows):
    """The live document tower over `[CLS] block [SEP]` rows built in numpy."""
    b, r = rows.shape
    ids = np.zeros((b * r, C + 2), np.int32)
    for i, row in enumerate(rows.reshape(-1)):
        n = int(corpus["lengths"][row]) if row >= 0 else 0
        body = corpus["tokens"][row, :n] if row >= 0 else []
        ids[i, :n + 2] = [SPECIAL.cls, *body, SPECIAL.sep]
    mask = (np.arange(C + 2) < (ids != 0).sum(1, keepdims=True)).astype(np.int32)
    out = configs["doc_tower"].module().apply({"params": params["doc_tower"]}, ids, mask)
    return np.asarray(out).reshape(b, r, -1)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_live_document_tower_loss_by_hand_and_sharded(tiny):
    configs, params, corpus, batch = tiny
    model = _model(configs, "refresh")
    loss_fn = jax.value_and_grad(lambda p, b, c: model.loss(p, b, c, None), has_aux=True)
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    (loss, metrics), grads = _run(loss_fn, model, one, params, batch, corpus)
    # By hand: the retrieval logits from the live towers, the reader's from the model.
    q = np.asarray(configs["query_tower"].module().apply(
        {"params": params["query_tower"]}, batch["input_ids"], batch["attention_mask"]))
    d = _doc_embeddings(configs, params, corpus, batch["beam_ids"])
    logits = np.einsum("bp,brp->br", q, d) * 2.0
    span, _, _, span_valid = jax.jit(model.read)(params, batch, corpus, batch["beam_ids"][:, :K])
    want = orqa_loss(logits, batch["retrieval_correct"], span, batch["span_correct"],
                     beam_valid=batch["beam_ids"] >= 0, span_valid=span_valid)
    np.testing.assert_allclose(loss, want.loss, rtol=1e-4)
    np.testing.assert_allclose(metrics["retrieval_loss"], want.retrieval_loss, rtol=1e-4)
    # The index's embeddings play no part; the loss reaches all three parts.
    frozen = _model(configs, "query_side").loss(params, batch, corpus, None)[1]
    assert abs(float(frozen["retrieval_loss"]) - float(metrics["retrieval_loss"])) > 1e-3
    for part in configs:
        assert max(np.abs(g).max() for g in jax.tree.leaves(grads[part])) > 0, part
    (got, _), got_grads = _run(loss_fn, model, sharding.make_mesh((2, 2, 2)), params, batch,
                               corpus)
    np.testing.assert_allclose(got, loss, rtol=1e-5)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(grads["doc_tower"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
                 got_grads["doc_tower"], grads["doc_tower"])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_rerank_beam_is_the_live_top_of_the_over_retrieved(tiny):
    configs, params, corpus, batch = tiny
    over = 20
    model = _model(configs, "rerank", over_retrieve=over)
    q = np.asarray(configs["query_tower"].module().apply(
        {"params": params["query_tower"]}, batch["input_ids"], batch["attention_mask"]))
    pool = np.argsort(-(q @ corpus["embeddings"][:NUM_VALID].T), axis=1)[:, :over]
    live = np.einsum("bp,brp->br", q, _doc_embeddings(configs, params, corpus, pool))
    want = np.take_along_axis(pool, np.argsort(-live, axis=1)[:, :R], axis=1)
    search = lambda p, b, c: model.search(p, b, c)  # noqa: E731
    fields = {k: batch[k] for k in ("input_ids", "attention_mask")}
    got_one = _run(search, model, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                   params, fields, corpus)
    np.testing.assert_array_equal(got_one, want)
    assert (got_one != pool[:, :R]).any()       # the live tower re-ordered the stale index
    got = _run(search, model, sharding.make_mesh((2, 2, 2)), params, fields, corpus)
    np.testing.assert_array_equal(got, want)


def test_config_refusals():
    from realm_jax.tasks.orqa import check_config

    def refused(*overrides):
        c = config_lib.load_config("orqa:tiny", "data.corpus=x", "data.tokenizer=y", *overrides)
        with pytest.raises(ValueError) as e:
            check_config(c)
        return str(e.value)

    assert "model.train_doc_tower" in refused("retrieval.strategy=refresh")
    assert "model.train_doc_tower" in refused("model.train_doc_tower=True")
    assert "retrieval.strategy" in refused("retrieval.strategy=both")
    assert "over_retrieve" in refused("retrieval.strategy=rerank", "model.train_doc_tower=True")
    assert "retrieval.index" in refused("retrieval.strategy=refresh", "retrieval.index=/i",
                                        "model.train_doc_tower=True")
    assert "retriever_loss" in refused("retrieval.retriever_loss=pdist")


def test_refresher_min_overlap_holds_and_logs_the_work_saved(tmp_path, wiki_store):
    from types import SimpleNamespace

    from realm_jax.refresh import Refresher, RefreshSettings, Source
    from realm_jax.workdir import Workdir

    def refresher(min_overlap):
        config = config_lib.load_config("orqa:tiny", f"data.corpus={wiki_store}",
                                        f"refresh.min_overlap={min_overlap}")
        return Refresher(tmp_path, RefreshSettings.from_config(config), progress=False)

    served = SimpleNamespace(version="v1")
    source = lambda step: Source(step, "checkpoint", str(tmp_path / str(step)))  # noqa: E731
    r = refresher(0.5)
    assert not r._drift_holds(source(2), served)            # no measurement: publish
    Workdir(tmp_path).write_drift(step=2, index="v0", index_step=0, overlap=0.1)
    assert r._drift_holds(source(2), served)                # v1 not measured yet: hold
    Workdir(tmp_path).write_drift(step=4, index="v1", index_step=2, overlap=0.8)
    assert r._drift_holds(source(4), served)                # close enough: hold
    assert r._drift_holds(source(4), served)                # (logged once)
    Workdir(tmp_path).write_drift(step=6, index="v1", index_step=2, overlap=0.4)
    assert not r._drift_holds(source(6), served)            # drifted: publish
    assert not r._drift_holds(source(6), None)              # no index yet: publish
    assert not refresher(0.0)._drift_holds(source(8), served)
    log = [json.loads(line) for line in (tmp_path / "refresh_log.jsonl").read_text().splitlines()]
    n = len(r.store)
    assert [(x["held_step"], x["blocks_saved"], x["blocks_saved_total"]) for x in log] == [
        (2, n, n), (4, n, 2 * n)]


def _e2e_config(store, tokenizer, model, *overrides):
    return _orqa_config(store, tokenizer, model, "model.train_doc_tower=True",
                        "train.eval_questions=0", "train.log_every=1",
                        "refresh.poll_seconds=0.1", *overrides)


def _train_rows(workdir):
    from realm_jax.train.metrics import read_metrics
    return [r for r in read_metrics(workdir) if "loss" in r]


def test_trainer_and_refresher_side_by_side(tmp_path, wiki_store, minilm_1layer, minilm_path):
    """The refresher publishes the --from_hf index, then follows the fine-tuning run's
    checkpoints (model.json has a doc_tower); the trainer waits for the index of its step-2
    checkpoint (train.max_index_staleness=2) and swaps it in; drift every 2 steps."""
    from realm_jax.tasks import orqa as train_orqa
    from realm_jax.train.metrics import read_metrics

    config = _e2e_config(wiki_store, minilm_path, minilm_1layer, "retrieval.strategy=refresh",
                         "train.checkpoint_every=2", "train.max_index_staleness=2",
                         "train.index_wait_seconds=300", "retrieval.drift_every=2")
    result = train_beside_refresher(config, tmp_path, from_hf=minilm_1layer)
    rows = _train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["staleness"] == r["step"] - r["index_step"]
    # A snapshot of the step-2 checkpoint was swapped in at step 2 (the trainer waited).
    assert (2, 2) in [(s["step"], s["checkpoint_step"]) for s in result["swaps"]]
    assert rows[2]["index_step"] == 2 and rows[2]["staleness"] == 1
    # The refresher embedded the run's checkpoints, through the last one.
    log = [json.loads(line) for line in (tmp_path / "refresh_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and {0, 2, 4} <= {x["step"] for x in log}
    # Drift measured at the start, at step 2 and at the end, beside the staleness.
    drift = [r for r in read_metrics(tmp_path) if "drift/overlap" in r]
    assert [r["step"] for r in drift] == [0, 2, 4]
    for r in drift:
        assert 0.0 <= r["drift/overlap"] <= 1.0 and r["drift/probes"] == 8
        assert r["staleness"] == r["step"] - r["index_step"]
    assert drift[0]["drift/overlap"] > 0.5                 # the index is of the live towers
    written = json.loads((tmp_path / "drift.json").read_text())
    assert written["step"] == 4 and written["overlap"] == pytest.approx(
        drift[-1]["drift/overlap"])
    # All three parts moved, the document tower through the re-embedded beam.
    _, initial = train_orqa.build_models(config)
    trained = jax.device_get(result["final_state"].params)
    for part in ("query_tower", "reader", "doc_tower"):
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), initial[part],
                                             trained[part]))
        assert max(moved) > 0, part


@pytest.mark.parametrize("strategy", ["rerank", "refresh"])
def test_a_run_training_the_doc_tower_resumes_exactly(tmp_path, wiki_store, minilm_1layer,
                                                      minilm_path, strategy):
    """A "rerank" or "refresh" run stopped at step 2 and resumed ends with the parameters of
    a run that went straight to step 4 (one index for both, built once from the --from_hf
    tower; no refresher, so "refresh" serves that index throughout)."""
    from realm_jax import refresh
    from realm_jax.train import trainer

    config = _e2e_config(wiki_store, minilm_path, minilm_1layer,
                         f"retrieval.strategy={strategy}", "retrieval.over_retrieve=16")
    index = tmp_path / "first"
    refresh.main(config, index, once=True, from_hf=minilm_1layer, progress=False)
    for name in ("straight", "resumed"):
        shutil.copytree(index / "index", tmp_path / name / "index")
    straight = trainer.train(config, tmp_path / "straight")
    stopped = trainer.train(config, tmp_path / "resumed", stop_after=2)
    assert int(stopped["final_state"].step) == 2
    resumed = trainer.train(config, tmp_path / "resumed")
    assert int(resumed["final_state"].step) == 4
    a, b = (_train_rows(tmp_path / n) for n in ("straight", "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    assert [r["staleness"] for r in a] == [1, 2, 3, 4] and straight["swaps"] == []
    x, y = (jax.device_get(r["final_state"].params) for r in (straight, resumed))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), x, y)
    assert set(x) == {"query_tower", "reader", "doc_tower"}
