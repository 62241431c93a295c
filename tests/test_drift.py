"""Drift of a served index against exact search with the live towers: overlap@k and rank
correlation by hand (and against scipy), the refresh decision."""

import numpy as np
import pytest

from realm_jax.index.drift import (
    measure_drift, overlap_at_k, rank_correlation, refresh_due)

SERVED = np.array([
    [1, 2, 3, 4],      # three shared with the exact row, two of them swapped
    [7, 8, 9, 10],     # identical
    [4, 3, 2, 1],      # reversed
    [11, 12, 13, 14],  # disjoint
    [5, -1, -1, -1],   # a one-document corpus: empty slots never match
])
EXACT = np.array([
    [2, 1, 3, 9],
    [7, 8, 9, 10],
    [1, 2, 3, 4],
    [21, 22, 23, 24],
    [5, -1, -1, -1],
])


def test_overlap_by_hand():
    np.testing.assert_allclose(overlap_at_k(SERVED, EXACT), [0.75, 1.0, 1.0, 0.0, 1.0])
    # k = 2: {1, 2} vs {2, 1}; {7, 8}; {4, 3} vs {1, 2}; -; {5}
    np.testing.assert_allclose(overlap_at_k(SERVED, EXACT, k=2), [1.0, 1.0, 0.0, 0.0, 1.0])
    empty = overlap_at_k([[1, 2]], [[-1, -1]])
    assert np.isnan(empty).all()


def test_rank_correlation_by_hand():
    # row 0: shared 1, 2, 3 ranked (1, 2, 3) served and (2, 1, 3) exact: sum d^2 = 2,
    # rho = 1 - 6 * 2 / (3 * 8) = 0.5
    rho = rank_correlation(SERVED, EXACT)
    np.testing.assert_allclose(rho[:3], [0.5, 1.0, -1.0])
    assert np.isnan(rho[3:]).all()     # no shared id; one shared id


def test_rank_correlation_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    served = np.stack([rng.permutation(12)[:8] for _ in range(20)])
    exact = np.stack([rng.permutation(12)[:8] for _ in range(20)])
    rho = rank_correlation(served, exact)
    for s, e, r in zip(served, exact, rho):
        shared = [i for i in s if i in e]
        if len(shared) < 2:
            assert np.isnan(r)
            continue
        expected = stats.spearmanr([list(s).index(i) for i in shared],
                                   [list(e).index(i) for i in shared]).statistic
        np.testing.assert_allclose(r, expected, atol=1e-12)


def test_measure_drift_metrics():
    m = measure_drift(SERVED, EXACT).metrics()
    np.testing.assert_allclose(m["drift/overlap"], np.mean([0.75, 1.0, 1.0, 0.0, 1.0]))
    np.testing.assert_allclose(m["drift/rank_correlation"], np.mean([0.5, 1.0, -1.0]))
    assert m["drift/probes"] == 5.0
    with pytest.raises(ValueError, match="k=5"):
        overlap_at_k(SERVED, EXACT, k=5)
    with pytest.raises(ValueError, match="served_ids and exact_ids"):
        overlap_at_k(SERVED, EXACT[:2])


def test_refresh_due():
    assert refresh_due(0.6, 0.7) and not refresh_due(0.8, 0.7) and not refresh_due(0.7, 0.7)
    assert not refresh_due(float("nan"), 0.7)
    assert refresh_due(0.9, 0.7, staleness=500, max_staleness=500)
    assert not refresh_due(0.9, 0.7, staleness=499, max_staleness=500)
    with pytest.raises(ValueError, match="threshold"):
        refresh_due(0.5, 1.5)
    with pytest.raises(ValueError, match="staleness"):
        refresh_due(0.5, 0.7, max_staleness=10)
