"""Exact maximum-inner-product search on the devices.

The corpus embedding matrix [N, P] is sharded along its rows (the logical axis "corpus")
over the mesh. Each shard scans its rows in blocks, keeping a running top-k (so the full
[Q, N] score matrix never exists), offsets its local row indices to global ones, and the
per-shard candidates are all-gathered for a global top-k. Ties go to the lower row index,
as in `base.exact_search`.

`device_topk` is a pure function for use inside a jitted step; `DeviceSearcher` holds a
padded, sharded matrix and answers host queries through the `Searcher` interface.

Blocking and memory traffic. A search of Q queries reads each shard's rows once
(N x P x itemsize bytes, whatever the block size) and, per block of B rows, computes a
[Q, B] float32 score tile that the top-k merge then reads: 8 x Q bytes of score traffic per
corpus row against P x itemsize bytes of corpus (bfloat16, P = 128: 256 bytes), so beyond a
few dozen queries the scores, not the corpus, dominate unless the tile stays in the chip's
cache (a GPU's L2, tens of MiB). The block size trades that against the fixed cost of each
block (a scan iteration: a few kernel launches and a top-k over B + k columns): small enough
that a [Q, B] tile fits in cache, as large as that allows. `block_size_for` picks it from Q.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realm_jax import sharding as rsharding
from realm_jax.index import base

DEFAULT_BLOCK_SIZE = 4096
# The score-tile budget of `block_size_for`: about half a Hopper GPU's 50 MiB L2.
SCORE_TILE_BYTES = 24 << 20


def block_size_for(num_queries: int, tile_bytes: int = SCORE_TILE_BYTES,
                   smallest: int = 1024, largest: int = 1 << 16) -> int:
    """The largest power-of-two block (within [smallest, largest]) whose [num_queries,
    block] float32 score tile takes at most `tile_bytes` (see the module docstring)."""
    rows = max(1, tile_bytes // (4 * max(1, int(num_queries))))
    block = 1 << (rows.bit_length() - 1)
    return int(min(max(block, smallest), largest))


def corpus_mesh_axes(mesh: Mesh | jax.sharding.AbstractMesh,
                     rules=rsharding.DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the logical "corpus" axis maps onto (only those the mesh has)."""
    for name, axes in rules:
        if name == "corpus":
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            return tuple(a for a in axes if a in mesh.axis_names)
    return ()


def corpus_sharding(mesh: Mesh, rules=rsharding.DEFAULT_RULES) -> NamedSharding:
    """Rows of the [N, P] embedding matrix split over the corpus axes, columns whole."""
    axes = corpus_mesh_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes or None, None))


def padded_rows(n: int, mesh: Mesh | jax.sharding.AbstractMesh, block_size: int,
                rules=rsharding.DEFAULT_RULES) -> tuple[int, int]:
    """(rows, block size) of an n-row corpus laid out on `mesh`: the same whole number of
    blocks on every corpus shard, a block no larger than a shard's share of the rows."""
    shards = math.prod(mesh.shape[a] for a in corpus_mesh_axes(mesh, rules))
    per_shard = -(-n // shards)
    block_size = min(int(block_size), per_shard)
    return -(-per_shard // block_size) * block_size * shards, block_size


def _merge(best_s, best_r, scores, rows, k):
    """Top-k of the running best and a new candidate set (running first: on ties the lower
    row, which was seen earlier, wins because lax.top_k is stable)."""
    s = jnp.concatenate([best_s, scores], axis=1)
    r = jnp.concatenate([best_r, rows], axis=1)
    s, pos = lax.top_k(s, k)
    return s, jnp.take_along_axis(r, pos, axis=1)


def local_topk(queries: jax.Array, embeddings: jax.Array, k: int, *,
               block_size: int = DEFAULT_BLOCK_SIZE, row_offset: jax.Array | int = 0,
               num_valid: jax.Array | int | None = None, row_valid: jax.Array | None = None,
               precision=lax.Precision.HIGHEST, varying_axes: tuple[str, ...] = ()
               ) -> tuple[jax.Array, jax.Array]:
    """Top-k of `queries @ embeddings.T` over blocks of rows, on one device.

    Rows get global indices `row_offset + i`; rows whose global index is >= num_valid, and
    rows where `row_valid` [N] (bool, this device's rows) is False, score -inf. Returns
    (scores [Q, k] float32, rows [Q, k] int32); empty slots hold (-inf, -1).
    `varying_axes`: inside shard_map, the manual mesh axes the running top-k varies over.
    """
    n, p = embeddings.shape
    q = queries.shape[0]
    queries = queries.astype(jnp.float32)
    block = max(1, min(int(block_size), n))
    num_blocks, tail = divmod(n, block)
    row_offset = jnp.asarray(row_offset, jnp.int32)

    if row_valid is not None and row_valid.shape != (n,):
        raise ValueError(f"local_topk: row_valid {row_valid.shape} must be [{n}], one per row")

    def score(blk, start, valid):
        s = jnp.dot(queries, blk.astype(jnp.float32).T, precision=precision,
                    preferred_element_type=jnp.float32)
        rows = row_offset + start + jnp.arange(blk.shape[0], dtype=jnp.int32)
        rows = jnp.broadcast_to(rows, s.shape)
        if num_valid is not None:
            s = jnp.where(rows < num_valid, s, -jnp.inf)
        if valid is not None:
            s = jnp.where(valid[None, :], s, -jnp.inf)
        return s, rows

    best_s = jnp.full((q, k), -jnp.inf, jnp.float32)
    best_r = jnp.full((q, k), base.NO_ID, jnp.int32)
    if varying_axes:
        best_s, best_r = lax.pcast((best_s, best_r), tuple(varying_axes), to="varying")
    if num_blocks:
        blocks = embeddings[:num_blocks * block].reshape(num_blocks, block, p)
        valid = (None if row_valid is None
                 else row_valid[:num_blocks * block].reshape(num_blocks, block))

        def step(carry, xs):
            blk, i, ok = xs
            s, rows = score(blk, i * block, ok)
            return _merge(*carry, s, rows, k), None

        (best_s, best_r), _ = lax.scan(
            step, (best_s, best_r),
            (blocks, jnp.arange(num_blocks, dtype=jnp.int32), valid))
    if tail:
        s, rows = score(embeddings[num_blocks * block:], num_blocks * block,
                        None if row_valid is None else row_valid[num_blocks * block:])
        best_s, best_r = _merge(best_s, best_r, s, rows, k)
    return best_s, jnp.where(best_s == -jnp.inf, base.NO_ID, best_r)


def device_topk(queries: jax.Array, embeddings: jax.Array, k: int, *,
                block_size: int = DEFAULT_BLOCK_SIZE, num_valid: jax.Array | int | None = None,
                row_valid: jax.Array | None = None,
                mesh: Mesh | jax.sharding.AbstractMesh | None = None,
                rules=rsharding.DEFAULT_RULES,
                precision=lax.Precision.HIGHEST) -> tuple[jax.Array, jax.Array]:
    """Exact top-k inner products of queries [Q, P] against embeddings [N, P].

    Pure and traceable: call it inside `jax.jit`. The embeddings are taken as sharded by
    rows over the mesh axes the "corpus" rule names (`corpus_sharding(mesh)`); `mesh`
    defaults to the mesh set by `jax.set_mesh`/`sharding.activate`, and with no mesh the
    search runs unsharded. N must divide evenly over the corpus shards (pad it, and pass
    num_valid: rows with index >= num_valid are never returned). `row_valid` [N] bool,
    sharded as the rows: rows where it is False are never returned either (the removed
    blocks of an updated corpus). Queries are replicated.
    The embeddings may be float16/bfloat16; scores are float32.

    Returns (scores [Q, k] float32, rows [Q, k] int32) sorted by descending score, ties to
    the lower row; slots without a candidate hold (-inf, -1). Outputs are replicated.
    """
    if queries.ndim != 2 or embeddings.ndim != 2 or queries.shape[1] != embeddings.shape[1]:
        raise ValueError(f"device_topk: queries {queries.shape} and embeddings "
                         f"{embeddings.shape} must be [Q, P] and [N, P]")
    k = int(k)
    if k < 1:
        raise ValueError(f"device_topk: k must be >= 1, got {k}")
    local = functools.partial(local_topk, k=k, block_size=block_size, precision=precision)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh = None if mesh.empty else mesh
    axes = corpus_mesh_axes(mesh, rules) if mesh is not None else ()
    shards = math.prod(mesh.shape[a] for a in axes)
    if shards == 1:
        return local(queries, embeddings, num_valid=num_valid, row_valid=row_valid)
    n = embeddings.shape[0]
    if n % shards:
        raise ValueError(f"device_topk: N={n} rows do not divide over {shards} corpus shards "
                         f"(mesh axes {axes}); pad the matrix and pass num_valid")
    per_shard = n // shards

    def shard_fn(qs, emb, valid, *ok):
        # this shard's index along the flattened axes, major to minor as PartitionSpec
        # lays the rows out
        offset = lax.axis_index(axes) * per_shard
        s, r = local(qs, emb, row_offset=offset, num_valid=valid,
                     row_valid=ok[0] if ok else None, varying_axes=axes)
        # [Q, shards * k], shard-major: on ties top_k keeps the lower global row.
        s = lax.all_gather(s, axes, axis=1, tiled=True, to="invarying")
        r = lax.all_gather(r, axes, axis=1, tiled=True, to="invarying")
        s, pos = lax.top_k(s, k)
        return s, jnp.take_along_axis(r, pos, axis=1)

    valid_arg = jnp.asarray(n if num_valid is None else num_valid, jnp.int32)
    masks = () if row_valid is None else (row_valid,)
    return jax.shard_map(shard_fn, mesh=mesh,
                         in_specs=(PartitionSpec(), PartitionSpec(axes, None), PartitionSpec(),
                                   *(PartitionSpec(axes),) * len(masks)),
                         out_specs=(PartitionSpec(), PartitionSpec()))(
        queries, embeddings, valid_arg, *masks)


def _bucket(q: int) -> int:
    """Query count rounded up to a power of two (>= 8), to bound recompilations."""
    return max(8, 1 << (max(q, 1) - 1).bit_length())


class DeviceSearcher:
    """Exact search over a corpus matrix held sharded on the mesh's devices.

    The matrix is padded to a multiple of (corpus shards x block) rows; padding rows are
    masked to -inf and never returned. `embeddings`, `num_valid` and `block_size` are what
    a jitted step needs to call `device_topk` itself. precision: of the float32 scoring
    matmul (HIGHEST: exact float32 on TPU too; DEFAULT is faster for bfloat16 corpora).
    """

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray | None = None, *,
                 mesh: Mesh | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: Any = None, rules=rsharding.DEFAULT_RULES,
                 precision=lax.Precision.HIGHEST):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [N, P], got shape {embeddings.shape}")
        n, p = embeddings.shape
        if n == 0:
            raise ValueError("DeviceSearcher: the corpus is empty")
        self._ids = base.check_ids(ids, n)
        self.mesh = mesh if mesh is not None else rsharding.make_mesh()
        self.rules = rules
        padded, self.block_size = padded_rows(n, self.mesh, block_size, rules)
        dtype = np.dtype(dtype) if dtype is not None else embeddings.dtype
        self.sharding = corpus_sharding(self.mesh, rules)

        def shard_rows(index):
            rows = index[0]
            start, stop = rows.start or 0, rows.stop if rows.stop is not None else padded
            part = np.zeros((stop - start, p), dtype)
            real = np.asarray(embeddings[start:min(stop, n)], dtype=dtype)
            part[:len(real)] = real
            return part

        self.embeddings = jax.make_array_from_callback((padded, p), self.sharding, shard_rows)
        self.num_valid = n
        self._search = jax.jit(functools.partial(
            device_topk, block_size=self.block_size, num_valid=n, mesh=self.mesh, rules=rules,
            precision=precision),
            static_argnames="k")

    @property
    def size(self) -> int:
        return self.num_valid

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.embeddings.dtype

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = base.check_queries(queries, self.dim, k)
        q = queries.shape[0]
        padded = np.zeros((_bucket(q), self.dim), np.float32)
        padded[:q] = queries
        queries_dev = jax.device_put(padded, rsharding.replicated(self.mesh))
        scores, rows = self._search(queries_dev, self.embeddings, k=int(k))
        scores, rows = np.asarray(scores)[:q], np.asarray(rows)[:q]
        return scores, base.map_ids(rows, self._ids)
