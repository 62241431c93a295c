"""Maximum-inner-product search over corpus embeddings, and versioned index snapshots.

- `base`: the `Searcher` interface, exact numpy search, recall@k.
- `device`: exact search on the devices over a corpus-sharded matrix (`device_topk`,
  `DeviceSearcher`); imports JAX.
- `scann_searcher`: approximate search on the host with ScaNN (`ScannSearcher`).
- `drift`: how far a served snapshot has drifted from the live towers on probe queries
  (overlap@k, rank correlation) and when that makes a refresh due; numpy only.
- `rerank`: keep the top k of over-retrieved candidates by the live towers' scores; JAX.
- `store`: atomic, validated snapshots under WORKDIR/index (`IndexStore`, `SnapshotWatcher`).
- `mining`: DPR hard negatives from a searcher or BM25 (`mine_hard_negatives`,
  `mine_bm25_negatives`).

Names are imported lazily, so e.g. the store can be used without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Searcher": "base", "NumpySearcher": "base", "exact_search": "base",
    "recall_at_k": "base",
    "DeviceSearcher": "device", "device_topk": "device", "corpus_sharding": "device",
    "ScannSearcher": "scann_searcher", "ScannSettings": "scann_searcher",
    "Drift": "drift", "measure_drift": "drift", "overlap_at_k": "drift",
    "rank_correlation": "drift", "refresh_due": "drift",
    "Reranked": "rerank", "rerank": "rerank",
    "IndexStore": "store", "Snapshot": "store", "SnapshotError": "store",
    "SnapshotWatcher": "store",
    "mine_hard_negatives": "mining", "mine_bm25_negatives": "mining",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
