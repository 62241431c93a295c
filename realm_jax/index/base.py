"""The searcher interface shared by the MIPS backends, and exact numpy search.

A searcher answers maximum-inner-product queries over a fixed corpus of embeddings:
`search(queries [Q, P] float32, k) -> (scores [Q, k] float32, ids [Q, k] int64)`, each row
sorted by descending score (ties: lower id first). Ids are the stable integer block ids of
the corpus: the row index of the embedding matrix unless an id array was given. A slot with
no candidate (k larger than the corpus) holds score -inf and id -1.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

NO_ID = -1


@runtime_checkable
class Searcher(Protocol):
    """Maximum-inner-product search over a fixed corpus."""

    @property
    def size(self) -> int:
        """Number of corpus vectors."""
        ...

    @property
    def dim(self) -> int:
        """Embedding dimension P."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, ids [Q, k] int64), sorted by descending score."""
        ...


def check_queries(queries, dim: int, k: int) -> np.ndarray:
    """Queries as a float32 [Q, dim] array; a clear error for a wrong shape or k."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape [Q, {dim}], got {queries.shape}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return queries


def check_ids(ids, count: int) -> np.ndarray | None:
    """Block ids as int64 [count] (or None for row indices); must be unique."""
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.shape != (count,):
        raise ValueError(f"ids must have shape ({count},), got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if count and len(np.unique(ids)) != count:
        raise ValueError("ids must be unique")
    return ids


def map_ids(rows: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
    """Row indices -> block ids (int64); negative rows stay NO_ID."""
    rows = np.asarray(rows).astype(np.int64)
    if ids is None:
        return rows
    return np.where(rows >= 0, ids[np.clip(rows, 0, None)], NO_ID)


# Rows per block of the exact numpy search: small blocks keep the scores in reused memory,
# faster and steadier than large ones (the measurement: docs/experiments.md).
EXACT_BLOCK_ROWS = 2048


def exact_search(queries: np.ndarray, embeddings: np.ndarray, k: int,
                 ids: np.ndarray | None = None, block_size: int = EXACT_BLOCK_ROWS
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact MIPS in numpy, float32 scores, over blocks of rows (memory [Q, block]).

    Sorted by descending score, equal scores by row index (which of several rows tied at
    the k-th score is kept is not defined)."""
    queries = check_queries(queries, embeddings.shape[1], k)
    n, q = embeddings.shape[0], queries.shape[0]
    best_s = np.full((q, 0), -np.inf, np.float32)
    best_r = np.full((q, 0), NO_ID, np.int64)
    for start in range(0, n, block_size):
        block = np.asarray(embeddings[start:start + block_size], dtype=np.float32)
        s, r = _top_k(queries @ block.T, k)
        best_s, best_r = _top_k(np.concatenate([best_s, s], axis=1), k,
                                np.concatenate([best_r, r + start], axis=1))
    order = np.lexsort((best_r, -best_s), axis=1)
    best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
    best_s, best_r = pad_to_k(best_s, best_r, k)
    return best_s, map_ids(best_r, ids)


def pad_to_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[Q, n] scores and rows with empty slots (-inf, NO_ID) appended up to k columns."""
    pad = ((0, 0), (0, max(0, k - scores.shape[1])))
    return (np.pad(scores, pad, constant_values=-np.inf),
            np.pad(rows, pad, constant_values=NO_ID))


def _top_k(scores: np.ndarray, k: int, rows: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The (unordered) k best columns of each row of scores and their rows (default: the
    column indices)."""
    if rows is None:
        rows = np.broadcast_to(np.arange(scores.shape[1], dtype=np.int64), scores.shape)
    if scores.shape[1] <= k:
        return scores, rows
    part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(scores, part, 1), np.take_along_axis(rows, part, 1)


class NumpySearcher:
    """Exact search on the host in numpy (the reference the other backends are checked
    against)."""

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray | None = None,
                 block_size: int = EXACT_BLOCK_ROWS):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [N, P], got shape {embeddings.shape}")
        self._embeddings = embeddings
        self._ids = check_ids(ids, embeddings.shape[0])
        self._block_size = block_size

    @property
    def size(self) -> int:
        return int(self._embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self._embeddings.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(queries, self._embeddings, k, self._ids, self._block_size)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of the true top-k ids found in the first k returned ids."""
    k = k or true_ids.shape[1]
    hits = [len(np.intersect1d(f[:k], t[:k])) for f, t in zip(found_ids, true_ids)]
    return float(np.mean(hits) / k)
