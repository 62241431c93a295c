"""RAG's retriever losses (retrieval.retriever_loss: emdr2, pdist, loop): the generator's
per-document log-likelihoods by hand; in the loss, the generator trained as with the
marginal (its gradients unchanged) and the question encoder by the distillation term alone;
the same loss and gradients sharded on 8 emulated devices as on one; a pdist run that
resumes exactly."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import sharding
from realm_jax.objectives import distill
from realm_jax.objectives.rag import rag_sequence_nll, sequence_log_likelihoods
from realm_jax.tasks import rag
from realm_jax.train import trainer
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


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_retriever_loss_sharded_equals_one_device(model):
    cfg, params, batch = model
    (loss, _), grads = _grads(cfg, params, batch, "loop",
                              sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    (got, _), got_grads = _grads(cfg, params, batch, "loop", sharding.make_mesh((2, 2, 2)))
    np.testing.assert_allclose(got, loss, rtol=1e-5)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(grads["question_encoder"]))
    assert _max_diff(got_grads["question_encoder"], grads["question_encoder"]) < 1e-4 * scale


def test_a_pdist_run_resumes_exactly(data):
    """RAG-Sequence with perplexity distillation on 8 devices (mesh 2 x 2 x 2): stopped at
    step 2 and resumed to 4, the parameters and losses of an uninterrupted run."""
    config = _config(data, "sequence", "--config.train.steps=4",
                     "--config.train.checkpoint_every=2", "--config.train.log_every=1",
                     "--config.retrieval.retriever_loss=pdist")
    stopped, straight = _workdir(data, "pdist_a"), _workdir(data, "pdist_b")
    trainer.train(config, stopped, stop_after=2)
    resumed = trainer.train(config, stopped)
    reference = trainer.train(config, straight)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["final_state"].params),
                 jax.device_get(reference["final_state"].params))
    rows = _train_rows(stopped)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in _train_rows(straight)]
    for r in rows:
        assert r["loss"] == pytest.approx(r["generator_loss"] + r["retriever_loss"], rel=1e-5)
        assert np.isfinite(r["retriever_loss"]) and r["retriever_loss"] >= 0
