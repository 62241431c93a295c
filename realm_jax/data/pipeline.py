"""What every training input pipeline shares: each process reads its own consecutive share of
every global batch."""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable

import grain


def check_batch_split(batch_size: int, process_count: int) -> None:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} must be positive and divide over "
                         f"{process_count} hosts")


def host_share(ds: grain.IterDataset, process_index: int, process_count: int
               ) -> grain.IterDataset:
    """`ds`'s batches (an array, or a dict of arrays) cut to this process's share: the
    `process_index`-th of `process_count` equal consecutive slices of each array (arrays of
    several rows per example, e.g. DPR's passages, are cut by their own length)."""
    if process_count == 1:
        return ds

    def share(x):
        n = len(x) // process_count
        return x[process_index * n:(process_index + 1) * n]

    return ds.map(lambda b: {k: share(v) for k, v in b.items()} if isinstance(b, dict)
                  else share(b))


class LruCache:
    """``compute(key)`` results, the ``size`` most recently used kept; thread-safe (the
    pipeline's worker threads share one)."""

    def __init__(self, size: int):
        self.size = size
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[Any], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute(key)   # outside the lock: other keys are served meanwhile
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value
