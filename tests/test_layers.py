"""The shared attention against a numpy softmax: masking, a row that may attend nowhere,
and dropout on the unnormalised weights."""

import jax.numpy as jnp
import numpy as np

from realm_jax.models.layers import dot_product_attention


def _reference(q, k, v, mask, keep=None):
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    if keep is not None:
        probs = probs * keep
    return np.einsum("bnts,bsnh->btnh", probs, v)


def test_attention_matches_softmax_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 1, 5, 5), bool)
    mask[0, :, :, 3:] = False          # padded keys
    mask[1] = np.tril(mask[1])         # causal
    out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(mask)))
    np.testing.assert_allclose(out, _reference(q, k, v, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v)),
                               _reference(q, k, v, np.ones_like(mask)), rtol=1e-5, atol=1e-6)

    # A query that may attend nowhere averages the values instead of giving NaN.
    nowhere = mask.copy()
    nowhere[0, :, 2, :] = False
    out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(nowhere)))
    np.testing.assert_allclose(out[0, 2], v[0].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], _reference(q, k, v, mask)[1], rtol=1e-5, atol=1e-6)

    # Dropout of the unnormalised weights equals dropout of the probabilities.
    keep = (rng.random((2, 3, 5, 5)) > 0.3) / 0.7
    out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(mask),
                                           dropout=lambda w: w * keep))
    np.testing.assert_allclose(out, _reference(q, k, v, mask, keep), rtol=1e-5, atol=1e-6)
