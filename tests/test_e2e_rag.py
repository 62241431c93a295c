"""RAG's retriever losses (retrieval.retriever_loss: emdr2, pdist, loop) and its trainable
document tower (model.train_doc_tower, retrieval.strategy refresh / rerank).

Losses: the generator's per-document log-likelihoods by hand; in the loss, the generator
trained as with the marginal (its gradients unchanged) and the question encoder by the
distillation term alone.

Each strategy x loss, cheaply: the strategies change only where the document scores come
from (the index's embeddings, or the live document tower over rows the batch carries) and,
before the step, which documents the batch holds; the losses are different pure functions
(`RagLossFn.head`) of the same model outputs. So (1) every loss's head on 8 emulated devices
equals one device's, loss and gradients, for RAG-Token and RAG-Sequence; (2) the live
document tower's full loss on 8 devices equals one device's (the frozen one's:
test_rag_model.py), its scores the towers' by hand; (3) the trainer resumes exactly for
each strategy with a different loss each (query_side: marginal in test_train_rag; rerank:
pdist), the state (params of every part, optimizer, data position) being the same pytree
whatever the loss; "refresh"'s step is rerank's live-document step over the index's top
documents, its extra state the served snapshot, which lives in WORKDIR/index, not in the
checkpoint: its trainer and refresher run side by side (EMDR²; swaps, staleness, drift).
"""

import functools
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import sharding
from realm_jax.objectives import distill
from realm_jax.objectives.rag import rag_sequence_nll, sequence_log_likelihoods
from realm_jax.tasks import end_to_end, rag
from realm_jax.train import trainer
from realm_jax.workdir import Workdir
from tiny_corpus import train_beside_refresher
from test_train_rag import _config, _train_rows, _workdir, data  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


def test_sequence_log_likelihoods_by_hand():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    targets = np.array([[1, 4, 0, 0], [2, 3, 3, 0]], np.int32)   # pad 0
    scores = rng.normal(size=(2, 3)).astype(np.float32)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.zeros((2, 3))
    for b in range(2):
        for k in range(3):
            want[b, k] = sum(lp[b, k, t, targets[b, t]] for t in range(4) if targets[b, t])
    got = sequence_log_likelihoods(logits, targets, pad_id=0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # exclude_bos_score leaves position 0 out.
    skip = sequence_log_likelihoods(logits, targets, pad_id=0, exclude_bos_score=True)
    np.testing.assert_allclose(skip, want - lp[np.arange(2)[:, None], np.arange(3),
                                                0, targets[:, :1]], rtol=1e-5)
    # The RAG-Sequence loss is their marginal under p(z|x).
    lp_z = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    marginal = -np.log(np.exp(want + lp_z).sum(-1))
    np.testing.assert_allclose(rag_sequence_nll(logits, targets, scores, pad_id=0, reduce=False),
                               marginal, rtol=1e-5)


@pytest.fixture(scope="module")
def model(data):
    """The tiny RAG model of test_train_rag's config, and a batch of random contexts."""
    config = _config(data, "sequence")
    cfg, params = rag.build_model(config, rag.load_tokenizers(config))
    b, k, s, t = 8, cfg.n_docs, 24, 6
    rng = np.random.default_rng(1)
    vocab = cfg.generator.vocab_size
    labels = rng.integers(5, vocab, (b, t)).astype(np.int32)
    labels[:, -2:] = cfg.generator.pad_token_id
    batch = {"question_ids": rng.integers(5, 100, (b, 16)).astype(np.int32),
             "question_mask": np.ones((b, 16), np.int32),
             "doc_embeddings": rng.normal(size=(b, k, cfg.retrieval_dim)).astype(np.float32),
             "context_ids": rng.integers(5, vocab, (b, k, s)).astype(np.int32),
             "context_mask": np.ones((b, k, s), np.int32),
             "decoder_input_ids": np.concatenate(
                 [np.full((b, 1), cfg.generator.decoder_start_token_id), labels[:, :-1]],
                 1).astype(np.int32), "labels": labels}
    return cfg, params, batch


def _grads(cfg, params, batch, retriever_loss, mesh):
    fn = rag.RagLossFn(cfg, "sequence", retriever_loss=retriever_loss, distill_temperature=0.5)
    p_sh = sharding.part_shardings({"rag": cfg}, mesh, sharding.DEFAULT_RULES)["rag"]
    b_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    f = jax.jit(jax.value_and_grad(lambda p, x: fn(p, x, None), has_aux=True),
                in_shardings=(p_sh, b_sh), out_shardings=NamedSharding(mesh, PartitionSpec()))
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        return jax.device_get(f(sharding.place(params, p_sh),
                                {k: jax.device_put(v, b_sh) for k, v in batch.items()}))


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def test_retriever_losses_train_the_question_encoder_only(model):
    cfg, params, batch = model
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    (marginal, _), base = _grads(cfg, params, batch, "marginal", one)
    out = cfg.module().apply({"params": params}, batch["question_ids"], batch["question_mask"],
                             batch["doc_embeddings"], batch["context_ids"],
                             batch["context_mask"], batch["decoder_input_ids"])
    ll = sequence_log_likelihoods(out.logits, batch["labels"], pad_id=cfg.generator.pad_token_id)
    for name, want in (("emdr2", distill.emdr2_loss(out.doc_scores, ll)),
                       ("pdist", distill.pdist_loss(out.doc_scores, ll, temperature=0.5)),
                       ("loop", distill.loop_loss(out.doc_scores, distill.leave_one_out_marginals(
                           out.doc_scores, ll), temperature=0.5))):
        (loss, metrics), grads = _grads(cfg, params, batch, name, one)
        np.testing.assert_allclose(metrics["generator_loss"], marginal, rtol=1e-5)
        np.testing.assert_allclose(metrics["retriever_loss"], want.loss, rtol=1e-4)
        np.testing.assert_allclose(loss, marginal + want.loss, rtol=1e-5)
        # The generator learns as with the marginal; the question encoder from the new term,
        # which for EMDR² under RAG-Sequence is the marginal's own gradient (the marginal
        # with the reader side fixed), and another one for the distillations.
        assert _max_diff(grads["generator"], base["generator"]) < 1e-5, name
        moved = _max_diff(grads["question_encoder"], base["question_encoder"])
        scale = max(np.abs(g).max() for g in jax.tree.leaves(base["question_encoder"]))
        assert moved < 1e-3 * scale if name == "emdr2" else moved > 1e-2 * scale, name
        assert max(np.abs(g).max() for g in jax.tree.leaves(grads["question_encoder"])) > 0


# ---------------------------------------------------------------------------------------
# The trainable document tower

@pytest.fixture(scope="module")
def tower(data, model):
    """The document tower (the context encoder the index was built with) and rows of the
    batch's documents as the refresher builds them: real passages of the store."""
    config = _config(data, "sequence", *LIVE)
    cfg = model[0]
    tower_cfg, tower_params = rag.build_doc_tower(config)
    live = rag.LiveDocs.create(config, tower_cfg, data["store"])
    ids = np.arange(8 * cfg.n_docs).reshape(8, cfg.n_docs) % len(data["store"])
    ids[1, -1] = -1   # an empty slot
    return tower_cfg, tower_params, live, ids


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LIVE = ("--config.model.train_doc_tower=True", "--config.retrieval.strategy=refresh",
        "--config.refresh.max_length=48")


def test_live_rows_are_the_refreshers_and_embed_as_the_index(data, tower):
    """The trainer's rows of a passage are the refresher's, and the live document tower
    (untrained) embeds them as the published index holds them (float16 storage)."""
    from realm_jax.index.store import IndexStore

    tower_cfg, tower_params, live, ids = tower
    rows = live.tokens(ids)
    want = live.rows.rows(ids[0])
    for j, row in enumerate(want):
        n = len(row)
        np.testing.assert_array_equal(rows["doc_tokens"][0, j, :n], row)
        assert rows["doc_mask"][0, j].sum() == n and rows["doc_tokens"][0, j, n:].max() == 0
    assert rows["doc_mask"][1, -1].sum() == 1                 # the empty slot
    got = end_to_end.embed_docs(tower_cfg, tower_params, rows["doc_tokens"][:1],
                                rows["doc_mask"][:1])
    snapshot = IndexStore(data["index"]).latest()
    np.testing.assert_allclose(got[0], snapshot.block_embeddings()[ids[0]], atol=2e-3)


def _live_batch(batch, live, ids):
    out = {k: v for k, v in batch.items() if k != "doc_embeddings"}
    return dict(out, **live.tokens(ids))


def _head_grads(cfg, batch, mesh):
    """Every rag.loss x retriever_loss head: loss and gradients w.r.t. the outputs."""
    from realm_jax.models.rag import RagOutput

    heads = {(kind, name): rag.RagLossFn(cfg, kind, label_smoothing=0.1, retriever_loss=name,
                                         distill_temperature=0.5)
             for kind in rag.LOSSES for name in rag.RETRIEVER_LOSSES}

    def all_heads(logits, scores, labels):
        return {f"{k}/{n}": jax.value_and_grad(
            lambda lo, sc, fn=fn: fn.head(RagOutput(lo, sc), labels)[0], argnums=(0, 1))(
                logits, scores) for (k, n), fn in heads.items()}

    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    f = jax.jit(all_heads, in_shardings=(rows, rows, rows),
                out_shardings=NamedSharding(mesh, PartitionSpec()))
    args = [jax.device_put(batch[k], rows) for k in ("logits", "scores", "labels")]
    return jax.device_get(f.lower(*args).compile(FAST)(*args))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_every_loss_head_sharded_equals_one_device(model):
    cfg, _, batch = model
    rng = np.random.default_rng(2)
    b, k, t = batch["labels"].shape[0], cfg.n_docs, batch["labels"].shape[1]
    outputs = {"logits": rng.normal(size=(b, k, t, cfg.generator.vocab_size)).astype(np.float32),
               "scores": rng.normal(size=(b, k)).astype(np.float32), "labels": batch["labels"]}
    one = _head_grads(cfg, outputs, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    eight = _head_grads(cfg, outputs, sharding.make_mesh((2, 2, 2)))
    assert len(one) == len(rag.LOSSES) * len(rag.RETRIEVER_LOSSES)
    for name, (loss, grads) in one.items():
        np.testing.assert_allclose(eight[name][0], loss, rtol=1e-5, err_msg=name)
        for got, want in zip(eight[name][1], grads):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max(),
                                       err_msg=name)
        assert np.abs(grads[1]).max() > 0, name              # the retriever learns


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_live_document_tower_loss_by_hand_and_sharded(model, tower):
    """The scores of the live tower's loss are question encoder . document tower (by
    hand); the loss (LOOP) and the gradients of both towers on 8 devices are one device's."""
    cfg, params, batch = model
    tower_cfg, tower_params, live, ids = tower
    params = dict(params, doc_tower=tower_params)
    batch = _live_batch(batch, live, ids)
    fn = rag.RagLossFn(cfg, "sequence", retriever_loss="loop", distill_temperature=0.5,
                       doc_tower=tower_cfg)
    q = cfg.question_encoder.module().apply({"params": params["question_encoder"]},
                                            batch["question_ids"], batch["question_mask"])
    docs = end_to_end.embed_docs(tower_cfg, tower_params, batch["doc_tokens"], batch["doc_mask"])
    np.testing.assert_allclose(fn.outputs(params, batch, None).doc_scores,
                               np.einsum("bp,bkp->bk", q, docs), rtol=1e-4, atol=1e-5)

    configs = {"rag": cfg, "doc_tower": tower_cfg}

    def grads(mesh):
        p_sh = rag.rag_param_shardings(configs, mesh, sharding.DEFAULT_RULES)
        b_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        f = jax.jit(jax.value_and_grad(lambda p, x: fn(p, x, None), has_aux=True),
                    in_shardings=(p_sh, b_sh), out_shardings=NamedSharding(mesh, PartitionSpec()))
        args = (sharding.place(params, p_sh),
                {k: jax.device_put(v, b_sh) for k, v in batch.items()})
        with sharding.activate(mesh, sharding.DEFAULT_RULES):
            return jax.device_get(f.lower(*args).compile(FAST)(*args))

    (loss, _), want = grads(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    (got, _), got_grads = grads(sharding.make_mesh((2, 2, 2)))
    np.testing.assert_allclose(got, loss, rtol=1e-5)
    for part in ("question_encoder", "doc_tower"):
        scale = max(np.abs(g).max() for g in jax.tree.leaves(want[part]))
        assert scale > 0 and _max_diff(got_grads[part], want[part]) < 1e-4 * scale, part


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_rerank_keeps_the_live_best_of_the_over_retrieved(model, tower):
    cfg, params, batch = model
    tower_cfg, tower_params, live, _ = tower
    rng = np.random.default_rng(3)
    pool = np.stack([rng.permutation(len(live.rows.store))[:6] for _ in range(8)])
    pool[2, -1] = -1
    q = rng.normal(size=(8, cfg.retrieval_dim)).astype(np.float32)
    rows = live.tokens(pool)
    docs = np.asarray(end_to_end.embed_docs(tower_cfg, tower_params, rows["doc_tokens"],
                                            rows["doc_mask"]))
    scores = np.where(pool >= 0, np.einsum("bp,brp->br", q, docs), -np.inf)
    want = np.take_along_axis(pool, np.argsort(-scores, axis=1, kind="stable")[:, :3], axis=1)
    mesh = sharding.make_mesh((2, 2, 2))
    put = functools.partial(end_to_end.question_batch,
                            batch_sharding=sharding.batch_sharding(mesh))
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        ids, live_scores = live.choose(tower_params, q, pool, 3, put)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(live_scores, np.take_along_axis(scores, np.argsort(
        -scores, axis=1, kind="stable")[:, :3], axis=1), rtol=1e-4)
    assert (ids != pool[:, :3]).any()


def test_rag_strategy_settings_and_old_configs(data, tmp_path):
    def refused(*overrides):
        with pytest.raises(ValueError) as e:
            rag.check_config(_config(data, "", *overrides))
        return str(e.value)

    assert "model.train_doc_tower" in refused("--config.retrieval.strategy=rerank",
                                              "--config.retrieval.over_retrieve=4")
    assert "rag.n_docs" in refused("--config.retrieval.strategy=rerank",
                                   "--config.model.train_doc_tower=True")
    assert "drift_every" in refused("--config.retrieval.drift_every=2")
    # A config.json written before these fields existed reads their defaults (Workdir.
    # read_config): the frozen document tower.
    saved = _config(data, "").to_dict()
    for section, field in (("model", "train_doc_tower"), ("retrieval", "strategy"),
                           ("retrieval", "over_retrieve"), ("retrieval", "drift_every")):
        del saved[section][field]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = Workdir(tmp_path).read_config()
    rag.check_config(old)
    task = rag.RagTask(old)
    assert task.how == end_to_end.Strategy("query_side", 0) and not task.how.live_docs
    configs, params = task.build()
    assert set(configs) == {"rag"} and set(params) == {"question_encoder", "generator"}
    assert set(task.lr_multipliers()) == {"question_encoder"}


@pytest.mark.parametrize("strategy, loss", [("rerank", "pdist"), ("refresh", "emdr2")])
def test_a_run_training_the_doc_tower_resumes_exactly(data, strategy, loss):
    """RAG-Token, the document tower trained, "rerank" of 4 over-retrieved passages with
    perplexity distillation, or "refresh" (no refresher: the first index serves) with EMDR²,
    on 8 devices: stopped at step 1 and resumed to 2, the parameters and losses of an
    uninterrupted run; all three parts move; checkpoints and model.json hold the doc_tower,
    and `realm-jax eval`'s answerer reads it and retrieves with it."""
    config = _config(data, "", "--config.train.steps=2", "--config.train.checkpoint_every=1",
                     "--config.train.fast_compile=True",
                     "--config.train.log_every=1", f"--config.retrieval.retriever_loss={loss}",
                     "--config.model.train_doc_tower=True",
                     f"--config.retrieval.strategy={strategy}",
                     "--config.retrieval.over_retrieve=4", "--config.refresh.max_length=48")
    stopped, straight = _workdir(data, f"{strategy}_a"), _workdir(data, f"{strategy}_b")
    trainer.train(config, stopped, stop_after=1)
    resumed = trainer.train(config, stopped)
    reference = trainer.train(config, straight)
    final = jax.device_get(resumed["final_state"].params)
    jax.tree.map(np.testing.assert_array_equal, final,
                 jax.device_get(reference["final_state"].params))
    rows = _train_rows(stopped)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == [r["loss"] for r in _train_rows(straight)]
    assert [r["staleness"] for r in rows] == [1, 2] and reference["swaps"] == []
    for r in rows:
        assert r["loss"] == pytest.approx(r["generator_loss"] + r["retriever_loss"], rel=1e-5)
        assert np.isfinite(r["retriever_loss"]) and r["retriever_loss"] >= 0
    _, initial = rag.RagTask(config).build()
    for part in ("question_encoder", "generator", "doc_tower"):
        assert _max_diff(initial[part], final[part]) > 0, part
    assert set(Workdir(stopped).read_model()) == {"rag", "doc_tower"}
    answerer = rag.RagAnswerer(config, stopped)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(answerer.params), final)
    dim = answerer.cfg.retrieval_dim
    q = np.random.default_rng(0).normal(size=(8, dim)).astype(np.float32)
    with sharding.activate(answerer.mesh, answerer.rules):
        ids, scores = answerer._documents(q)
    assert ids.shape == scores.shape == (8, answerer.depth) and (ids >= 0).all()
    assert (np.diff(scores, axis=1) <= 0).all()            # best live score first


def test_trainer_and_refresher_side_by_side(data, tmp_path):
    """RAG-Sequence, EMDR², "refresh": the refresher follows the run's checkpoints (model.json
    has a doc_tower) while the trainer runs; the trainer waits for the index of its step-2
    checkpoint (train.max_index_staleness=2) and swaps it in; drift every 2 steps."""
    from realm_jax.train.metrics import read_metrics

    config = _config(data, "sequence", *LIVE, "--config.train.steps=3",
                     "--config.train.checkpoint_every=2", "--config.train.log_every=1",
                     "--config.train.fast_compile=True",
                     "--config.retrieval.retriever_loss=emdr2",
                     "--config.train.max_index_staleness=2", "--config.retrieval.drift_every=2",
                     "--config.refresh.poll_seconds=0.1")
    workdir = tmp_path / "side"
    result = train_beside_refresher(config, workdir, from_hf=data["encoder"])
    rows = _train_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["staleness"] == r["step"] - r["index_step"]
        assert r["loss"] == pytest.approx(r["generator_loss"] + r["retriever_loss"], rel=1e-5)
    swaps = [(s["step"], s["checkpoint_step"]) for s in result["swaps"]]
    assert (2, 2) in swaps and rows[2]["index_step"] == 2, swaps
    log = [json.loads(x) for x in (workdir / "refresh_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and {0, 2, 3} <= {x["step"] for x in log}
    drift = [r for r in read_metrics(workdir) if "drift/overlap" in r]
    assert [r["step"] for r in drift] == [0, 2, 3]
    for r in drift:
        assert 0.0 <= r["drift/overlap"] <= 1.0 and r["drift/probes"] == len(data["qa"])
        assert r["staleness"] == r["step"] - r["index_step"]
    assert drift[0]["drift/overlap"] > 0.5                 # the index is of the live towers
    assert json.loads((workdir / "drift.json").read_text())["step"] == 3
    # The document tower moved, through the re-embedded documents.
    _, initial = rag.RagTask(config).build()
    trained = jax.device_get(result["final_state"].params)
    assert _max_diff(initial["doc_tower"], trained["doc_tower"]) > 0
