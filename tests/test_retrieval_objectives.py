"""ICT / DPR in-batch softmax losses (hand-computed; sharded on 8 emulated devices equal to
one device) and the gradient cache (equal to the plain value_and_grad of the whole batch)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import sharding
from realm_jax.models import EmbedderConfig, EncoderConfig
from realm_jax.objectives.grad_cache import grad_cache_value_and_grad
from realm_jax.objectives.retrieval import dpr_loss, ict_loss, in_batch_softmax
from tiny_corpus import numpy_params


def _hand_loss(q, c, positives, scale, context_valid=None):
    """Per-query nll and rank in plain Python floats."""
    nll, ranks = [], []
    for i, row in enumerate(q):
        scores = [scale * float(np.dot(row, ctx)) for j, ctx in enumerate(c)
                  if context_valid is None or context_valid[j]]
        pos = scale * float(np.dot(row, c[positives[i]]))
        nll.append(math.log(sum(math.exp(s) for s in scores)) - pos)
        ranks.append(1 + sum(s > pos for s in scores))
    return np.array(nll), np.array(ranks)


def test_ict_loss_by_hand():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    c = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]], np.float32)
    out = ict_loss(q, c, scale=0.5)
    # Query 0: scores 1, 0.5, 0 -> nll = log(e + e^.5 + 1) - 1, rank 1.
    assert float(out.nll[0]) == pytest.approx(math.log(math.e + math.exp(0.5) + 1) - 1, 1e-6)
    nll, ranks = _hand_loss(q, c, [0, 1, 2], 0.5)
    np.testing.assert_allclose(out.nll, nll, rtol=1e-6)
    # Query 1 scores 0 (a tie with context 0, which the positive wins) and 3 (higher).
    np.testing.assert_array_equal(out.rank, [1, 2, 1])
    np.testing.assert_array_equal(out.rank, ranks)
    assert float(out.loss) == pytest.approx(nll.mean(), rel=1e-6)
    assert float(out.accuracy) == pytest.approx(2 / 3)
    assert float(out.mean_rank) == pytest.approx(4 / 3)
    assert float(out.mrr) == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_ict_padding_rows_count_nothing():
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    valid = np.array([True, True, True, False, False])
    out = ict_loss(q, c, valid=valid)
    nll, _ = _hand_loss(q[:3], c[:3], [0, 1, 2], 1.0)
    np.testing.assert_allclose(out.nll[:3], nll, rtol=1e-5)
    assert float(out.loss) == pytest.approx(nll.mean(), rel=1e-5)
    np.testing.assert_array_equal(out.nll[3:], 0.0)
    grads = jax.jit(jax.grad(lambda a, b: ict_loss(a, b, valid=valid).loss, argnums=(0, 1)))(
        q, c)
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(grads[1][3:], 0.0)


def test_dpr_loss_by_hand():
    rng = np.random.default_rng(1)
    b, h = 3, 2
    q, p = rng.normal(size=(b, 4)), rng.normal(size=(b * (1 + h), 4))
    out = dpr_loss(q, p, scale=2.0)
    nll, ranks = _hand_loss(q, p, [0, 3, 6], 2.0)
    np.testing.assert_allclose(out.nll, nll, rtol=1e-5)
    np.testing.assert_array_equal(out.rank, ranks)
    # A missing hard negative (passage 4) takes no mass.
    valid = np.ones(b * (1 + h), bool)
    valid[4] = False
    nll, _ = _hand_loss(q, p, [0, 3, 6], 2.0, context_valid=valid)
    np.testing.assert_allclose(dpr_loss(q, p, scale=2.0, passage_valid=valid).nll, nll,
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"B \* \(1 \+ h\)"):
        dpr_loss(q, p[:-1])


def test_dpr_loss_equals_sentence_transformers_mnrl():
    """The loss benchmarks/bench_retriever_step.py compares against: sentence-transformers'
    MultipleNegativesRankingLoss (scale 20 x cosine) on (question, positive, hard negative)
    columns equals dpr_loss on the normalised embeddings with the passages interleaved."""
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    rng = np.random.default_rng(3)
    q, pos, neg = (rng.normal(size=(5, 6)) for _ in range(3))
    mnrl = losses.MultipleNegativesRankingLoss(None, scale=20.0)
    want = float(mnrl.compute_loss_from_embeddings(
        [torch.tensor(x) for x in (q, pos, neg)], torch.arange(5)))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    passages = np.stack([unit(pos), unit(neg)], axis=1).reshape(10, 6)
    got = dpr_loss(jnp.asarray(unit(q)), jnp.asarray(passages), scale=20.0).loss
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_sharded_loss_sees_the_global_batch():
    """With the batch sharded 8 ways on the data axis, every query still meets every
    context: the loss equals the one-device loss and the hand-computed one (a per-shard
    softmax would give a different, smaller loss)."""
    rng = np.random.default_rng(2)
    b, h = 16, 1
    q = rng.normal(size=(b, 8)).astype(np.float32)
    p = rng.normal(size=(b * (1 + h), 8)).astype(np.float32)
    mesh = sharding.make_mesh((8, 1, 1))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    scalar = NamedSharding(mesh, PartitionSpec())
    fns = {"ict": lambda a, c: ict_loss(a, c[:b]).loss, "dpr": lambda a, c: dpr_loss(a, c).loss}
    positives = {"ict": np.arange(b), "dpr": np.arange(b) * (1 + h)}
    for name, fn in fns.items():
        sharded = jax.jit(fn, in_shardings=(rows, rows), out_shardings=scalar)
        qs, ps = jax.device_put(q, rows), jax.device_put(p, rows)
        assert len(qs.sharding.device_set) == 8
        got = float(sharded(qs, ps))
        single = float(jax.jit(fn)(q, p))
        contexts = p[:b] if name == "ict" else p
        want = _hand_loss(q, contexts, positives[name], 1.0)[0].mean()
        assert got == pytest.approx(single, rel=1e-6), name
        assert got == pytest.approx(want, rel=1e-5), name
        local = np.mean([_hand_loss(q[s:s + 2], contexts[s * len(contexts) // b:
                                                         (s + 2) * len(contexts) // b],
                                    positives[name][:2], 1.0)[0].mean()
                         for s in range(0, b, 2)])
        assert abs(got - local) > 0.1, "the loss looks per-shard"


def test_in_batch_softmax_checks_shapes():
    with pytest.raises(ValueError, match="queries"):
        in_batch_softmax(np.zeros((2, 3)), np.zeros((2, 4)), np.arange(2))


# ------------------------------------------------------------------ gradient cache

# Cheap XLA settings: the point is the arithmetic, not the speed.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ENC = EncoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=16, dropout_rate=0.0,
                    attention_dropout_rate=0.0)


def _random_params(cfg, seed):
    return numpy_params(cfg, seed, std=0.3)


@pytest.fixture(scope="module")
def towers():
    q_cfg = EmbedderConfig(ENC, pooling="cls", projection_dim=8)
    c_cfg = EmbedderConfig(ENC, pooling="mean")
    params = {"q": _random_params(q_cfg, 0), "c": _random_params(c_cfg, 1)}
    return q_cfg.module(), c_cfg.module(), params


def _rows(rng, n, length):
    lengths = rng.integers(2, length + 1, n)
    mask = (np.arange(length) < lengths[:, None]).astype(np.int32)
    return {"input_ids": (rng.integers(1, 64, (n, length)) * mask).astype(np.int32),
            "attention_mask": mask}


@pytest.fixture(scope="module")
def grad_cache_case(towers):
    """A DPR batch, the loss on embeddings and the plain value_and_grad's result."""
    q_mod, c_mod, params = towers
    rng = np.random.default_rng(3)
    b, h = 8, 1
    queries, passages = _rows(rng, b, 6), _rows(rng, b * (1 + h), 10)

    def embed_q(p, x):
        return q_mod.apply({"params": p["q"]}, x["input_ids"], x["attention_mask"])

    def embed_c(p, x):
        return c_mod.apply({"params": p["c"]}, x["input_ids"], x["attention_mask"])

    # The projection makes query and context widths differ: compare through a fixed map.
    mix = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)

    def loss_on(qe, ce):
        out = dpr_loss(qe @ mix, ce, scale=3.0)
        return out.loss, out.accuracy

    def plain(p):
        return loss_on(embed_q(p, queries), embed_c(p, passages))

    want = jax.jit(jax.value_and_grad(plain, has_aux=True), compiler_options=FAST)(params)
    return params, queries, passages, embed_q, embed_c, loss_on, want


def _check_grads(got, want):
    (loss, acc), grads = got
    (want_loss, want_acc), want = want
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert float(acc) == float(want_acc)
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = jax.tree.leaves(grads)
    assert len(flat_want) == len(flat_got)
    scale = max(float(np.abs(w).max()) for _, w in flat_want)
    for (path, w), g in zip(flat_want, flat_got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    # Both towers get gradients (a wrong cotangent routing would leave one at zero).
    assert float(jnp.abs(grads["q"]["projection"]["kernel"]).max()) > 1e-4
    assert float(jnp.abs(grads["c"]["encoder"]["word_embeddings"]["embedding"]).max()) > 1e-4


def test_grad_cache_equals_plain_gradients(grad_cache_case):
    params, queries, passages, embed_q, embed_c, loss_on, want = grad_cache_case
    cached = jax.jit(lambda p: grad_cache_value_and_grad(
        embed_q, embed_c, loss_on, p, queries, passages, chunk_size=4, has_aux=True),
        compiler_options=FAST)
    _check_grads(cached(params), want)
    with pytest.raises(ValueError, match="chunk_size 3 must divide"):
        grad_cache_value_and_grad(embed_q, embed_c, loss_on, params, queries, passages, 3,
                                  has_aux=True)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_grad_cache_sharded_equals_plain_gradients(grad_cache_case):
    """The batch sharded 8 ways on the data axis (each chunk of 8 rows spread over all
    devices), the parameters replicated: the same loss and gradients."""
    params, queries, passages, embed_q, embed_c, loss_on, want = grad_cache_case
    mesh = sharding.make_mesh((8, 1, 1))
    rows, rep = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    cached = jax.jit(lambda p, q, c: grad_cache_value_and_grad(
        embed_q, embed_c, loss_on, p, q, c, chunk_size=8, has_aux=True),
        in_shardings=(rep, rows, rows), out_shardings=rep, compiler_options=FAST)
    _check_grads(cached(params, queries, passages), want)


def test_grad_cache_dropout_masks_match_between_passes():
    """With an rng, chunk c is embedded with fold_in(fold_in(rng, 0 or 1), c) in both passes:
    equal to the plain gradient of the loss over embeddings made with those same keys (a
    recomputation with other masks would differ). A linear "tower" with dropout."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    q, c = jnp.asarray(rng.normal(size=(8, 6))), jnp.asarray(rng.normal(size=(16, 6)))
    key = jax.random.key(9)

    def embed(p, x, k):
        return (x * jax.random.bernoulli(k, 0.5, x.shape)) @ p["w"]

    def loss_on(qe, ce):
        return dpr_loss(qe, ce).loss

    def reference(p):
        def embed_all(x, side, count):
            # Chunk i holds rows i, i + count, ...: place each chunk's rows back.
            out = jnp.zeros((x.shape[0], 4))
            for i in range(count):
                k = jax.random.fold_in(jax.random.fold_in(key, side), i)
                out = out.at[i::count].set(embed(p, x[i::count], k))
            return out
        return loss_on(embed_all(q, 0, 2), embed_all(c, 1, 4))

    want_loss, want = jax.jit(jax.value_and_grad(reference))(params)
    loss, grads = jax.jit(lambda p: grad_cache_value_and_grad(
        embed, embed, loss_on, p, q, c, chunk_size=4, rng=key))(params)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    np.testing.assert_allclose(grads["w"], want["w"], rtol=1e-4, atol=1e-6)
    no_dropout = loss_on(q @ params["w"], c @ params["w"])
    assert abs(float(no_dropout) - float(loss)) > 1e-3
