"""Re-ranking over-retrieved candidates with the live towers: the kept ids, scores and
positions by hand, masks, ties, jit and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.index.rerank import rerank

# Two questions, R = 4 candidates, P = 2. Live scores q . d:
#   question 0: q = (1, 0)  -> 0.5, 3.0, -1.0, 2.0  (the stale order was wrong)
#   question 1: q = (0, 1)  -> 4.0 (empty slot), 1.0, 9.0 (masked by `valid`), 1.0 (tie)
IDS = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
IDS_EMPTY = np.where([[False] * 4, [True, False, False, False]], -1, IDS)   # 20 not found
DOCS = np.array([[[0.5, 7.0], [3.0, 0.0], [-1.0, 1.0], [2.0, 5.0]],
                 [[1.0, 4.0], [0.0, 1.0], [0.0, 9.0], [5.0, 1.0]]], np.float32)
QUERIES = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
VALID = np.array([[True, True, True, True], [True, True, False, True]])


@pytest.fixture(scope="module")
def jitted():
    return jax.jit(rerank, static_argnums=3)


def test_top_k_by_live_score(jitted):
    out = jitted(IDS_EMPTY, DOCS, QUERIES, 2, valid=VALID)
    np.testing.assert_array_equal(out.ids, [[11, 13], [21, 23]])     # tie: stale order
    np.testing.assert_allclose(out.scores, [[3.0, 2.0], [1.0, 1.0]])
    np.testing.assert_array_equal(out.valid, True)
    np.testing.assert_array_equal(out.index, [[1, 3], [1, 3]])
    # the positions gather the kept candidates' embeddings
    kept = jnp.take_along_axis(jnp.asarray(DOCS), out.index[..., None], axis=1)
    np.testing.assert_allclose(kept[0], DOCS[0, [1, 3]])


def test_fewer_valid_than_k(jitted):
    out = jitted(IDS_EMPTY, DOCS, QUERIES, 4, valid=VALID)
    np.testing.assert_array_equal(out.ids[0], [11, 13, 10, 12])
    np.testing.assert_allclose(out.scores[0], [3.0, 2.0, 0.5, -1.0])
    # question 1: 20 is an empty slot (id -1), 22 masked: two valid, then two invalid
    np.testing.assert_array_equal(out.ids[1], [21, 23, -1, -1])
    np.testing.assert_array_equal(out.valid[1], [True, True, False, False])
    assert np.isneginf(out.scores[1, 2:]).all()
    # without `valid`, only the empty slot is dropped and the 9.0 candidate comes first
    np.testing.assert_array_equal(jitted(IDS_EMPTY, DOCS, QUERIES, 2).ids[1], [22, 21])


def test_gradients_reach_both_towers():
    def total(q, d):
        out = rerank(IDS_EMPTY, d, q, 2, valid=VALID)
        return jnp.where(out.valid, out.scores, 0.0).sum()
    gq, gd = jax.grad(total, argnums=(0, 1))(jnp.asarray(QUERIES), jnp.asarray(DOCS))
    # d/dq = sum of the kept documents; d/dd = q for the kept ones, 0 elsewhere
    np.testing.assert_allclose(gq, [DOCS[0, 1] + DOCS[0, 3], DOCS[1, 1] + DOCS[1, 3]])
    np.testing.assert_allclose(gd[0, [1, 3]], [[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(gd[0, [0, 2]], 0.0)
    np.testing.assert_array_equal(gd[1, [0, 2]], 0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k=5 must be in 1..R=4"):
        rerank(IDS, DOCS, QUERIES, 5)
    with pytest.raises(ValueError, match="query_embeddings"):
        rerank(IDS, DOCS, QUERIES[:1], 2)
