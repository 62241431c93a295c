"""REALM objective: hand-computed marginal loss and retrieval utility, gradients, the null
document, source-document exclusion and the reader input layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.models.encoder import EncoderConfig
from realm_jax.models.heads import MaskedLMConfig
from realm_jax.models.towers import EmbedderConfig, relevance_scores
from realm_jax.objectives.realm import (RealmLoss, exclude_source, prepend_null_score,
                                        reader_inputs, realm_loss, realm_loss_from_logits,
                                        target_log_probs)

# Two candidates (null, z1), two masked tokens, vocabulary of 3.
PRIOR = np.array([0.25, 0.75])                       # p(z | x): logits [0, ln 3]
PROBS = np.array([                                   # p(. | x, z) per candidate and token
    [[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]],          # null document
    [[0.8, 0.1, 0.1], [0.1, 0.6, 0.3]],              # z1
])
TARGETS = np.array([0, 1])
# By hand: token 1: 0.25 * 0.5 + 0.75 * 0.8 = 0.725; token 2: 0.25 * 0.25 + 0.75 * 0.6 = 0.5125.
MARGINAL = np.log([0.725, 0.5125])
NULL = np.log([0.5, 0.25])


def tiny_batch():
    """Example 0 as above; example 1 the same with its second token invalid (garbage)."""
    retrieval = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]], np.float32) + [[0.0], [5.0]]
    logits = np.log(np.stack([PROBS, PROBS])).astype(np.float32) + 2.0   # shift: same softmax
    logits[1, :, 1] = [7.0, -3.0, 1.0]
    targets = np.array([TARGETS, [0, 2]])
    valid = np.array([[True, True], [True, False]])
    return retrieval, logits, targets, valid


def test_target_log_probs_gathers_log_softmax():
    _, logits, targets, _ = tiny_batch()
    lp = np.asarray(target_log_probs(logits, targets))
    assert lp.shape == (2, 2, 2)
    np.testing.assert_allclose(lp[0], np.log([[0.5, 0.25], [0.8, 0.6]]), rtol=1e-6)
    ref = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(lp, np.take_along_axis(ref, targets[:, None, :, None], -1)[..., 0],
                               rtol=1e-6)


def test_hand_computed_loss_and_retrieval_utility():
    retrieval, logits, targets, valid = tiny_batch()
    out = realm_loss_from_logits(retrieval, logits, targets, valid)
    assert isinstance(out, RealmLoss)
    # Tokens: example 0 both, example 1 only the first (its marginal is 0.725 again).
    expected_loss = -(MARGINAL[0] + MARGINAL[1] + MARGINAL[0]) / 3
    expected_utility = ((MARGINAL[0] - NULL[0]) + (MARGINAL[1] - NULL[1])
                        + (MARGINAL[0] - NULL[0])) / 3
    assert float(out.loss) == pytest.approx(expected_loss, rel=1e-6)
    assert float(out.retrieval_utility) == pytest.approx(expected_utility, rel=1e-6)
    assert float(out.loss) == pytest.approx(-(2 * math.log(0.725) + math.log(0.5125)) / 3, rel=1e-6)
    assert float(out.retrieval_utility) == pytest.approx(
        (2 * math.log(0.725 / 0.5) + math.log(0.5125 / 0.25)) / 3, rel=1e-6)
    assert float(out.num_tokens) == 3
    np.testing.assert_allclose(out.marginal_log_probs, [MARGINAL, [MARGINAL[0], 0.0]], rtol=1e-6)
    np.testing.assert_allclose(out.null_log_probs, [NULL, [NULL[0], 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(out.retrieval_log_probs), [PRIOR, PRIOR], rtol=1e-6)
    jitted = jax.jit(realm_loss_from_logits)(retrieval, logits, targets, valid)
    np.testing.assert_allclose(jitted.loss, out.loss, rtol=1e-6)


def test_no_valid_token_gives_zero_not_nan():
    retrieval, logits, targets, valid = tiny_batch()
    out = realm_loss_from_logits(retrieval, logits, targets, np.zeros_like(valid))
    assert float(out.loss) == 0.0 and float(out.retrieval_utility) == 0.0
    assert float(out.num_tokens) == 0


def test_gradient_reaches_retrieval_logits_and_matches_finite_differences():
    retrieval, logits, targets, valid = tiny_batch()
    lp = target_log_probs(logits, targets)

    @jax.jit
    def loss_fn(r):
        return realm_loss(r, lp, valid).loss

    grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(retrieval)))
    assert np.abs(grad).min() > 1e-3
    eps = 1e-2
    numeric = np.zeros_like(retrieval)
    for idx in np.ndindex(retrieval.shape):
        up, down = retrieval.copy(), retrieval.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (float(loss_fn(up)) - float(loss_fn(down))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-2, atol=1e-4)
    # Closed form: d loss / d logit_k = (1/N) sum_j (p(z_k|x) - p(z_k|x,y_j)).
    post = PRIOR * PROBS[:, [0, 1], TARGETS].T / np.exp(MARGINAL)[:, None]   # [M, K]
    expected0 = (np.stack([PRIOR, PRIOR]) - post).sum(0) / 3
    np.testing.assert_allclose(grad[0], expected0, rtol=1e-5)
    # And the reader's logits get gradients too.
    g_reader = jax.grad(lambda x: realm_loss_from_logits(retrieval, x, targets, valid).loss)(
        jnp.asarray(logits))
    assert np.abs(np.asarray(g_reader)[0]).sum() > 0
    assert np.all(np.asarray(g_reader)[1, :, 1] == 0)   # invalid token: no gradient


def test_invalid_candidates_get_no_mass():
    retrieval, logits, targets, valid = tiny_batch()
    wide_r = np.concatenate([retrieval, [[50.0], [50.0]]], axis=1)
    wide_l = np.concatenate([logits, logits[:, :1]], axis=1)
    cand_valid = np.array([[True, True, False]] * 2)
    out = realm_loss_from_logits(wide_r, wide_l, targets, valid, cand_valid)
    ref = realm_loss_from_logits(retrieval, logits, targets, valid)
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)
    g = jax.grad(lambda r: realm_loss_from_logits(r, wide_l, targets, valid, cand_valid).loss)(
        jnp.asarray(wide_r))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, 2] == 0)


def test_null_document_score():
    scores = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(prepend_null_score(scores), [[0, 1, 2], [0, 3, 4]])
    np.testing.assert_array_equal(prepend_null_score(scores, jnp.array([5.0, 6.0])),
                                  [[5, 1, 2], [6, 3, 4]])
    # A null document that explains the tokens as well as z1 gives zero utility.
    lp = np.log(np.stack([PROBS[1], PROBS[1]]))[None, :, [0, 1], TARGETS]
    out = realm_loss(np.zeros((1, 2)), lp, np.ones((1, 2), bool))
    assert float(out.retrieval_utility) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_exclude_source_document(backend):
    conv = np.asarray if backend == "numpy" else jnp.asarray
    ids = conv(np.array([[5, 3, 7, 9, 2], [4, 8, -1, -1, -1]]))
    docs = conv(np.array([[1, 0, 1, 2, 3], [6, 6, -1, -1, -1]]))
    src = conv(np.array([1, 7]))
    cand, ok = exclude_source(ids, docs, src, 4)
    assert type(cand) is type(ids)
    np.testing.assert_array_equal(cand, [[-1, 3, 9, 2], [-1, 4, 8, -1]])
    np.testing.assert_array_equal(ok, [[1, 1, 1, 1], [1, 1, 1, 0]])
    cand, ok = exclude_source(ids, docs, src, 7)      # asks for more than were retrieved
    np.testing.assert_array_equal(cand, [[-1, 3, 9, 2, -1, -1, -1], [-1, 4, 8, -1, -1, -1, -1]])
    np.testing.assert_array_equal(ok.sum(1), [4, 3])
    if backend == "jax":
        jitted = jax.jit(exclude_source, static_argnums=3)(ids, docs, src, 4)
        np.testing.assert_array_equal(jitted[0], [[-1, 3, 9, 2], [-1, 4, 8, -1]])
    with pytest.raises(ValueError, match="source_docs"):
        exclude_source(ids, docs, src[:1], 4)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_exclusion_keys_block_or_document(backend):
    from realm_jax.tasks.realm import RealmLossFn, exclusion_keys
    conv = np.asarray if backend == "numpy" else jnp.asarray
    rows = conv(np.array([[4, 5, 6, 1, -1]]))       # blocks 4..6 are document 2; -1 empty
    row_docs = conv(np.array([0, 0, 1, 1, 2, 2, 2]))
    batch = {"block_id": conv(np.array([5])), "doc_index": conv(np.array([2]))}
    # "block": only the sentence's own block goes; its document's other blocks stay.
    cand, _ = exclude_source(rows, *exclusion_keys("block", rows, row_docs, batch), 4)
    np.testing.assert_array_equal(cand, [[-1, 4, 6, 1]])
    # "document": every block of document 2 goes; the empty slot stays empty.
    keys, src = exclusion_keys("document", rows, row_docs, batch)
    np.testing.assert_array_equal(keys, [[2, 2, 2, 0, -1]])
    cand, ok = exclude_source(rows, keys, src, 4)
    np.testing.assert_array_equal(cand, [[-1, 1, -1, -1]])
    np.testing.assert_array_equal(ok, [[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="retrieval.exclude"):
        exclusion_keys("article", rows, row_docs, batch)
    with pytest.raises(ValueError, match="retrieval.exclude"):
        RealmLossFn({}, None, 4, 0, 1.0, "scann", exclude="article")


CLS, SEP, MASK = 101, 102, 103


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_reader_input_layout(backend):
    conv = np.asarray if backend == "numpy" else jnp.asarray
    q = np.array([[CLS, 11, MASK, 12, SEP, 0, 0, 0],
                  [CLS, 21, 22, 23, 24, MASK, SEP, 0]])
    qm = (np.arange(8) < np.array([[5], [7]])).astype(np.int32)
    cands = np.zeros((2, 3, 4), np.int32)
    cands[:, 1] = [31, 32, 33, 34]
    cands[:, 2] = [41, 42, 0, 0]
    lengths = np.array([[0, 4, 2], [0, 4, 2]])
    out = reader_inputs(conv(q), conv(qm), conv(cands), conv(lengths), sep_id=SEP, length=11)
    ids, att, tt = (np.asarray(a) for a in out)
    assert ids.shape == att.shape == tt.shape == (2, 3, 11)
    np.testing.assert_array_equal(ids[0], [
        [CLS, 11, MASK, 12, SEP, SEP, 0, 0, 0, 0, 0],              # null document
        [CLS, 11, MASK, 12, SEP, 31, 32, 33, 34, SEP, 0],
        [CLS, 11, MASK, 12, SEP, 41, 42, SEP, 0, 0, 0]])
    np.testing.assert_array_equal(tt[0, 1], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(att[0, 1], [1] * 10 + [0])
    np.testing.assert_array_equal(ids[1], [                         # candidate cut to fit
        [CLS, 21, 22, 23, 24, MASK, SEP, SEP, 0, 0, 0],
        [CLS, 21, 22, 23, 24, MASK, SEP, 31, 32, 33, SEP],
        [CLS, 21, 22, 23, 24, MASK, SEP, 41, 42, SEP, 0]])
    np.testing.assert_array_equal(tt[1, 0], [0] * 7 + [1] + [0] * 3)
    assert ids[0, :, 2].tolist() == [MASK] * 3 and ids[1, :, 5].tolist() == [MASK] * 3
    default = reader_inputs(q, qm, cands, lengths, sep_id=SEP)
    assert default.input_ids.shape == (2, 3, 12)


def _random_params(module, rng, *args):
    """Random parameters of the right shapes (compiling a real init is slow on CPU)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    return jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)


def test_end_to_end_gradients_reach_both_towers_and_reader():
    """Tiny towers and reader wired through the objective: every part gets a gradient."""
    enc = EncoderConfig(vocab_size=120, hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=32, max_position_embeddings=32, dropout_rate=0.0,
                        attention_dropout_rate=0.0)
    tower = EmbedderConfig(enc, pooling="cls", projection_dim=8).module()
    reader = MaskedLMConfig(enc.replace(add_pooler=False)).module()
    rng = np.random.default_rng(0)
    b, k, clen = 2, 3, 6
    query = np.array([[CLS, 11, MASK, MASK, 12, SEP, 0, 0], [CLS, MASK, 21, 22, SEP, 0, 0, 0]])
    qmask = (query != 0).astype(np.int32)
    positions = np.array([[2, 3], [1, 0]])
    targets = np.array([[40, 41], [50, 0]])
    valid = np.array([[True, True], [True, False]])
    cands = rng.integers(30, 100, size=(b, k, clen)).astype(np.int32)
    lengths = np.array([[0, 6, 4], [0, 5, 6]])
    doc_in = np.concatenate([np.full((b, k, 1), CLS), cands, np.full((b, k, 1), SEP)], -1)
    doc_mask = (np.arange(clen + 2) < lengths[..., None] + 2).astype(np.int32)
    joint = reader_inputs(query, qmask, cands, lengths, sep_id=SEP)
    params = {
        "q": _random_params(tower, rng, query, qmask),
        "d": _random_params(tower, rng, query, qmask),
        "r": _random_params(reader, rng, joint.input_ids[:, 0], joint.attention_mask[:, 0],
                            joint.token_type_ids[:, 0], positions),
    }

    def loss_fn(p):
        qe = tower.apply({"params": p["q"]}, query, qmask)
        de = tower.apply({"params": p["d"]}, doc_in.reshape(b * k, -1),
                         doc_mask.reshape(b * k, -1)).reshape(b, k, -1)
        scores = relevance_scores(qe, de)
        flat = lambda a: a.reshape(b * k, -1)
        logits = reader.apply({"params": p["r"]}, flat(joint.input_ids),
                              flat(joint.attention_mask), flat(joint.token_type_ids),
                              jnp.repeat(positions, k, axis=0))
        logits = logits.reshape(b, k, positions.shape[1], -1)
        return realm_loss_from_logits(scores, logits, targets, valid).loss

    # Cheap compiler settings: the point is the wiring, not the speed of the step.
    fast_compile = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    loss, grads = jax.jit(jax.value_and_grad(loss_fn), compiler_options=fast_compile)(params)
    assert np.isfinite(float(loss))
    for part in ("q", "d", "r"):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads[part])))
        assert norm > 0, part
