"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this
folder is on the path)."""

import statistics
import time

import jax


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` (its result waited for) over `repeats` calls, after
    one warm-up call that compiles."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
