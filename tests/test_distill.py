"""Retriever losses (marginal, EMDR², PDist, LOOP): hand-computed values, gradients only to
the retriever where the reader side is a fixed target, masks, reductions, temperature limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.objectives import (
    emdr2_loss, leave_one_out_marginals, loop_loss, marginal_loss, pdist_loss, realm_loss)

# One question, two documents: p_retr = (1/2, 1/2), p_reader(y|x, z) = (0.2, 0.6).
# Marginal 0.4; posterior (0.25, 0.75); PDist's target at T = 1 is the same (0.25, 0.75),
# and so is LOOP's when leaving out z_0 leaves 0.6 and leaving out z_1 leaves 0.2.
SCORES = np.array([[3.0, 3.0]], np.float32)
READER = np.log(np.array([[0.2, 0.6]], np.float32))
LOO = np.log(np.array([[0.6, 0.2]], np.float32))
KL_HAND = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)          # KL((1/4, 3/4) || (1/2, 1/2))

DISTILL = {"emdr2": (emdr2_loss, READER), "pdist": (pdist_loss, READER),
           "loop": (loop_loss, LOO)}


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(target_logits, scores):
    lt, lr = _np_log_softmax(target_logits), _np_log_softmax(scores)
    return (np.exp(lt) * (lt - lr)).sum(-1)


def test_hand_values():
    m = marginal_loss(SCORES, READER)
    np.testing.assert_allclose(m.loss, -np.log(0.4), rtol=1e-6)
    np.testing.assert_allclose(m.target_probs, [[0.25, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(m.retriever_log_probs, np.log([[0.5, 0.5]]), rtol=1e-6)
    np.testing.assert_allclose(emdr2_loss(SCORES, READER).loss, -np.log(0.4), rtol=1e-6)
    for fn, reader in (DISTILL["pdist"], DISTILL["loop"]):
        out = fn(SCORES, reader)
        np.testing.assert_allclose(out.loss, KL_HAND, rtol=1e-5)
        np.testing.assert_allclose(out.target_probs, [[0.25, 0.75]], rtol=1e-6)
        assert float(out.metrics["top1_agreement"]) == 0.0   # retriever tie -> index 0
    # T = 2: target proportional to sqrt(0.2), sqrt(0.6)
    t = np.sqrt([0.2, 0.6]) / np.sqrt([0.2, 0.6]).sum()
    np.testing.assert_allclose(pdist_loss(SCORES, READER, temperature=2.0).loss,
                               (t * np.log(t / 0.5)).sum(), rtol=1e-5)


def test_against_numpy_reference():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 5)).astype(np.float32)
    reader = rng.normal(size=(4, 5)).astype(np.float32) - 3.0
    t, tr = 0.7, 1.3
    lr = _np_log_softmax(scores / tr)
    marginal = -np.log((np.exp(lr) * np.exp(reader)).sum(-1))
    np.testing.assert_allclose(emdr2_loss(scores, reader, retriever_temperature=tr,
                                          reduce="none").loss, marginal, rtol=1e-5)
    np.testing.assert_allclose(pdist_loss(scores, reader, temperature=t,
                                          retriever_temperature=tr, reduce="none").loss,
                               _np_kl(reader / t, scores / tr), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loop_loss(scores, reader, temperature=t, retriever_temperature=tr,
                                         reduce="sum").loss,
                               _np_kl(-reader / t, scores / tr).sum(), rtol=1e-5)
    # the marginal is REALM's with one target per question
    realm = realm_loss(scores / tr, reader[:, :, None], np.ones((4, 1), bool))
    np.testing.assert_allclose(marginal_loss(scores, reader, retriever_temperature=tr).loss,
                               realm.loss, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(DISTILL))
def test_gradient_reaches_only_the_retriever(name):
    fn, reader = DISTILL[name]
    g_scores, g_reader = jax.grad(lambda s, r: fn(s, r).loss, argnums=(0, 1))(
        jnp.asarray(SCORES), jnp.asarray(reader))
    np.testing.assert_array_equal(g_reader, 0.0)
    # d loss / d scores = p_retr - target = (1/2, 1/2) - (1/4, 3/4) for all three
    np.testing.assert_allclose(g_scores, [[0.25, -0.25]], rtol=1e-5)
    g2 = jax.grad(lambda s: fn(s, reader, retriever_temperature=2.0).loss)(jnp.asarray(SCORES))
    np.testing.assert_allclose(g2, [[0.125, -0.125]], rtol=1e-5)


def test_marginal_trains_the_reader_too():
    g_reader = jax.grad(lambda r: marginal_loss(SCORES, r).loss)(jnp.asarray(READER))
    np.testing.assert_allclose(g_reader, [[-0.25, -0.75]], rtol=1e-5)   # -posterior
    g_stopped = jax.grad(lambda r: marginal_loss(SCORES, r, stop_reader_gradient=True).loss)(
        jnp.asarray(READER))
    np.testing.assert_array_equal(g_stopped, 0.0)


@pytest.mark.parametrize("name", ["marginal"] + sorted(DISTILL))
def test_invalid_documents_get_no_mass(name):
    fn, reader = (marginal_loss, READER) if name == "marginal" else DISTILL[name]
    # Row 0: the hand example plus a junk third slot; row 1: no valid document at all.
    scores = np.array([[3.0, 3.0, 50.0], [1.0, 2.0, 3.0]], np.float32)
    junk = np.array([[np.nan], [np.nan]], np.float32)
    reader3 = np.concatenate([np.concatenate([reader, [[0.0, 0.0]]]), junk], axis=1)
    valid = np.array([[True, True, False], [False, False, False]])
    out = fn(scores, reader3, valid, reduce="none")
    expected = -np.log(0.4) if name in ("marginal", "emdr2") else KL_HAND
    np.testing.assert_allclose(out.loss, [expected, 0.0], rtol=1e-5)
    np.testing.assert_array_equal(out.target_probs[:, 2], 0.0)
    np.testing.assert_array_equal(out.target_probs[1], 0.0)
    assert np.isneginf(out.retriever_log_probs[:, 2]).all()
    np.testing.assert_allclose(np.exp(out.retriever_log_probs[0, :2]), [0.5, 0.5], rtol=1e-6)
    assert float(out.metrics["examples"]) == 1.0
    # "mean" counts only questions with a valid document
    np.testing.assert_allclose(fn(scores, reader3, valid).loss, expected, rtol=1e-5)
    g = jax.grad(lambda s: fn(s, reader3, valid).loss)(jnp.asarray(scores))
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[:, 2], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)
    np.testing.assert_allclose(g[0, :2], [0.25, -0.25], rtol=1e-5)


def test_temperature_limits():
    scores = np.array([[0.0, 1.0, 2.0]], np.float32)
    reader = np.array([[-1.0, -3.0, -2.0]], np.float32)
    lr = _np_log_softmax(scores)
    cold = pdist_loss(scores, reader, temperature=1e-4)      # one-hot on the best document
    np.testing.assert_allclose(cold.target_probs, [[1.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(cold.loss, -lr[0, 0], rtol=1e-5)
    hot = pdist_loss(scores, reader, temperature=1e5)        # uniform over the documents
    np.testing.assert_allclose(hot.target_probs, np.full((1, 3), 1 / 3), rtol=1e-4)
    np.testing.assert_allclose(hot.loss, (np.log(1 / 3) - lr[0]).mean(), rtol=1e-4)
    # LOOP: all mass on the document whose removal leaves the lowest likelihood
    np.testing.assert_allclose(loop_loss(scores, reader, temperature=1e-4).target_probs,
                               [[0.0, 1.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        pdist_loss(scores, reader, temperature=0.0)


def test_jit_with_traced_temperature_and_bad_arguments():
    f = jax.jit(lambda s, r, t: pdist_loss(s, r, temperature=t).loss)
    np.testing.assert_allclose(f(SCORES, READER, 1.0), KL_HAND, rtol=1e-5)
    with pytest.raises(ValueError, match="reduce must be one of"):
        emdr2_loss(SCORES, READER, reduce="avg")
    with pytest.raises(ValueError, match="reader_log_likelihoods"):
        pdist_loss(SCORES, READER[:, :1])
    with pytest.raises(ValueError, match="valid"):
        loop_loss(SCORES, LOO, np.ones((2, 2), bool))


def test_leave_one_out_marginals():
    p_retr, p_reader = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.4, 0.8])
    scores = np.log(p_retr)[None].astype(np.float32) + 7.0     # softmax ignores the shift
    reader = np.log(p_reader)[None].astype(np.float32)
    hand = np.log([(0.3 * 0.4 + 0.2 * 0.8) / 0.5,               # without z_0
                   (0.5 * 0.1 + 0.2 * 0.8) / 0.7,               # without z_1
                   (0.5 * 0.1 + 0.3 * 0.4) / 0.8])              # without z_2
    np.testing.assert_allclose(leave_one_out_marginals(scores, reader)[0], hand, rtol=1e-5)
    # masked: z_2 invalid; leaving out z_0 leaves z_1 alone, and the reverse
    out = leave_one_out_marginals(scores, reader, np.array([[True, True, False]]))
    np.testing.assert_allclose(out[0], [np.log(0.4), np.log(0.1), 0.0], rtol=1e-5)
    only = leave_one_out_marginals(scores, reader, np.array([[False, True, False]]))
    np.testing.assert_array_equal(only, 0.0)
    # Feeds LOOP: the document whose removal hurts most (z_2 here) gets the most mass
    target = loop_loss(scores, leave_one_out_marginals(scores, reader)).target_probs[0]
    assert int(np.argmax(target)) == 2
