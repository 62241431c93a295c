"""What every training input pipeline shares: each process reads its own consecutive share of
every global batch."""

from __future__ import annotations

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
