"""Exact device search (realm_jax.index.device) against numpy brute force."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import sharding
from realm_jax.index import base, device

N, P, Q, K = 1003, 16, 5, 7


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(N, P)).astype(np.float32)
    queries = rng.normal(size=(Q, P)).astype(np.float32)
    return emb, queries


def _mesh(shape):
    n = int(np.prod(shape))
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices")
    return sharding.make_mesh(shape, devices=jax.devices()[:n])


def _assert_same(got, want, atol=1e-5):
    (gs, gi), (ws, wi) = got, want
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_allclose(gs, ws, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (2, 2, 2)])
def test_searcher_matches_numpy(data, shape):
    emb, queries = data
    # 1003 rows over 8 shards with blocks of 32: padded, and N % (shards * block) != 0.
    searcher = device.DeviceSearcher(emb, mesh=_mesh(shape), block_size=32)
    assert isinstance(searcher, base.Searcher)
    assert searcher.size == N and searcher.dim == P
    assert searcher.embeddings.shape[0] % (int(np.prod(shape)) * 32) == 0
    got = searcher.search(queries, K)
    _assert_same(got, base.exact_search(queries, emb, K))
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64
    # Padding rows are never returned, even when k exceeds the corpus.
    scores, ids = searcher.search(queries[:2], N + 3)
    assert sorted(ids[0, :N]) == list(range(N))
    assert (ids[:, N:] == -1).all() and np.isneginf(scores[:, N:]).all()


def test_searcher_float16_and_ids(data):
    emb, queries = data
    ids = np.arange(N, dtype=np.int64) * 10 + 7
    searcher = device.DeviceSearcher(emb.astype(np.float16), ids, mesh=_mesh((8, 1, 1)),
                                     block_size=64)
    assert searcher.dtype == jnp.float16
    want = base.exact_search(queries, emb.astype(np.float16), K, ids)
    _assert_same(searcher.search(queries, K), want, atol=1e-4)


def _nested_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _nested_shapes(inner)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_device_topk_inside_jit(data, shape):
    """The pure function under the caller's mesh, in a jitted step, with a per-shard row
    count that is not a multiple of the block (a tail block) and num_valid masking."""
    emb, queries = data
    mesh = _mesh(shape)
    rows = 8 * 50  # 50 rows per shard on 8 shards: one block of 32 and a tail of 18
    valid = 390

    @functools.partial(jax.jit, static_argnames="k")
    def step(q, e, k):
        scores, ids = device.device_topk(q * 2.0, e, k, block_size=32, num_valid=valid)
        return scores / 2.0, ids

    with sharding.activate(mesh):
        e = jax.device_put(emb[:rows], device.corpus_sharding(mesh))
        q = jax.device_put(queries, sharding.replicated(mesh))
        scores, ids = step(q, e, k=K)
        jaxpr = jax.make_jaxpr(functools.partial(step.__wrapped__, k=K))(q, e)
    _assert_same((np.asarray(scores), np.asarray(ids)),
                 base.exact_search(queries, emb[:valid], K))
    # Never a [Q, N] score matrix: score-like intermediates are at most [Q, k + block]
    # (running top-k and one block) or [Q, shards * k] (the gathered candidates).
    shapes = set(_nested_shapes(jaxpr.jaxpr))
    widths = {s[1] for s in shapes if len(s) == 2 and s[0] == Q}
    assert K + 32 in widths and max(widths) <= max(K + 32, 8 * K), widths


def test_errors(data):
    emb, queries = data
    with pytest.raises(ValueError, match="do not divide"):
        with sharding.activate(_mesh((8, 1, 1))):
            jax.jit(lambda q, e: device.device_topk(q, e, 3))(queries, emb[:1001])
    searcher = device.DeviceSearcher(emb[:40], mesh=_mesh((1, 1, 1)))
    with pytest.raises(ValueError, match=r"shape \[Q, 16\]"):
        searcher.search(queries[:, :8], 3)


def test_block_size_for_fits_the_score_tile():
    from realm_jax.index.device import block_size_for
    # 24 MiB / (4 bytes x 1024 queries) = 6144 rows -> 4096; / (4 x 3000) = 2097 -> 2048.
    assert block_size_for(1024) == 4096 and block_size_for(3000) == 2048
    assert block_size_for(32) == 1 << 16            # capped: few queries, big blocks
    assert block_size_for(10 ** 6) == 1024          # floored
    assert block_size_for(64, tile_bytes=64 * 4 * 5000) == 4096


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_device_topk_row_valid_masks_removed_rows(data, shape):
    """Rows marked invalid (the removed blocks of an updated corpus, laid out by block id)
    are never returned, even for a query equal to one of them scaled up, whatever k: the
    result is the exact search of the valid rows alone, with their own row numbers."""
    emb, queries = data
    mesh = _mesh(shape)
    rows, valid = 8 * 50, 390
    ok = np.random.default_rng(1).random(rows) > 0.3
    ok[valid:] = True  # rows past num_valid stay masked by num_valid alone
    queries = np.concatenate([queries, 100.0 * emb[np.flatnonzero(~ok)[:2]]])
    search = jax.jit(functools.partial(device.device_topk, block_size=32, num_valid=valid),
                     static_argnames="k")
    keep = np.flatnonzero(ok[:valid])
    with sharding.activate(mesh):
        e = jax.device_put(emb[:rows], device.corpus_sharding(mesh))
        m = jax.device_put(ok, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(device.corpus_sharding(mesh).spec[0])))
        q = jax.device_put(queries, sharding.replicated(mesh))
        got = search(q, e, k=K, row_valid=m)
        _, every = search(q, e, k=len(keep) + 4, row_valid=m)
    _assert_same(tuple(map(np.asarray, got)), base.exact_search(queries, emb[keep], K, keep))
    every = np.asarray(every)
    assert (np.sort(every[:, :len(keep)], axis=1) == keep).all()
    assert (every[:, len(keep):] == -1).all()
