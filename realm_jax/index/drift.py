"""How far a served (stale) index has drifted from the live towers, measured on probe queries.

The trainer keeps a fixed probe set of queries. Now and then it embeds them with the live
query tower and asks two questions: which top k does the served snapshot return
(``served_ids``, from its searcher), and which top k would an exact search over freshly
embedded candidates return (``exact_ids``: embed the candidates with the live document tower,
then :func:`realm_jax.index.base.exact_search` with their block ids). The less the two agree,
the more the index's staleness costs, whatever the number of steps it is behind.

    overlap@k         |A ∩ B| / |B| per probe, A the served ids and B the exact ids (|B| = k
                      unless the exact search had fewer than k candidates)
    rank correlation  Spearman's rho between the two orders of the shared ids (nan with
                      fewer than two shared ids)

Ids are int block ids, best first, unique within a row, negative (NO_ID) for empty slots;
empty slots never match. Pure numpy.
"""

from __future__ import annotations

from numbers import Real
from typing import NamedTuple

import numpy as np

__all__ = ["Drift", "measure_drift", "overlap_at_k", "rank_correlation", "refresh_due"]


class Drift(NamedTuple):
    """Per-probe drift (:func:`measure_drift`)."""

    overlap: np.ndarray           # [Q] overlap@k (nan for a probe with no exact id)
    rank_correlation: np.ndarray  # [Q] Spearman's rho over the shared ids (nan with < 2)

    def metrics(self, prefix: str = "drift/") -> dict[str, float]:
        """Means over the probes where defined (nan when none is), for the metric writer."""
        def mean(x):
            return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else float("nan")
        return {f"{prefix}overlap": mean(self.overlap),
                f"{prefix}rank_correlation": mean(self.rank_correlation),
                f"{prefix}probes": float(len(self.overlap))}


def _matches(served_ids, exact_ids, k: int | None) -> np.ndarray:
    """[Q, k, k] bool: served slot i holds the id of exact slot j (real ids only)."""
    a, b = np.asarray(served_ids), np.asarray(exact_ids)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"need served_ids and exact_ids [Q, k], got {a.shape} and {b.shape}")
    k = min(a.shape[1], b.shape[1]) if k is None else int(k)
    if not 1 <= k <= min(a.shape[1], b.shape[1]):
        raise ValueError(f"k={k} must be in 1..{min(a.shape[1], b.shape[1])} "
                         f"(served_ids {a.shape}, exact_ids {b.shape})")
    a, b = a[:, :k], b[:, :k]
    return (a[:, :, None] == b[:, None, :]) & (b[:, None, :] >= 0)


def overlap_at_k(served_ids, exact_ids, k: int | None = None) -> np.ndarray:
    """[Q] |served top k ∩ exact top k| / (real ids in the exact top k); k defaults to the
    shorter row; nan for a probe whose exact row is empty."""
    match = _matches(served_ids, exact_ids, k)
    k = match.shape[1]
    real = (np.asarray(exact_ids)[:, :k] >= 0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(real > 0, match.any(2).sum(1) / real, np.nan)


def rank_correlation(served_ids, exact_ids, k: int | None = None) -> np.ndarray:
    """[Q] Spearman's rho between the served and the exact order of the ids both top k hold:
    1 - 6 sum d^2 / (n (n^2 - 1)), d the difference of an id's ranks among the n shared ids;
    nan when n < 2."""
    match = _matches(served_ids, exact_ids, k)
    rank_a = np.cumsum(match.any(2), axis=1)                   # rank among shared, by served
    rank_b = np.cumsum(match.any(1), axis=1)                   # rank among shared, by exact
    d2 = (match * (rank_a[:, :, None] - rank_b[:, None, :]) ** 2).sum((1, 2))
    n = match.any(2).sum(1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n >= 2, 1.0 - 6.0 * d2 / (n * (n * n - 1.0)), np.nan)


def measure_drift(served_ids, exact_ids, k: int | None = None) -> Drift:
    """Both measures per probe; ``.metrics()`` gives their means."""
    return Drift(overlap_at_k(served_ids, exact_ids, k), rank_correlation(served_ids, exact_ids, k))


def refresh_due(overlap: float, threshold: float, *, staleness: int | None = None,
                max_staleness: int | None = None) -> bool:
    """True when the mean overlap@k has fallen under ``threshold`` (in [0, 1]), or, with
    ``max_staleness``, when the index is at least that many steps behind whatever the drift
    (a cap for towers that drift slowly but steadily). A nan overlap (no probe measured)
    decides nothing."""
    if not (isinstance(threshold, Real) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"refresh_due: threshold must be in [0, 1], got {threshold!r}")
    if max_staleness is not None:
        if staleness is None:
            raise ValueError("refresh_due: max_staleness needs the index's staleness (steps)")
        if staleness >= max_staleness:
            return True
    return bool(overlap < threshold)
