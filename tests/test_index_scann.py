"""ScaNN searcher (realm_jax.index.scann_searcher): recall, exact mode, serialization."""

import numpy as np
import pytest

from realm_jax.index import base
from realm_jax.index.scann_searcher import ScannSearcher, ScannSettings, principal_dims


def clustered(n, dim, num_queries, seed=0, clusters=200):
    """Unit vectors around random cluster centres; queries drawn the same way (not copies
    of corpus rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    def draw(m):
        x = centres[rng.integers(0, clusters, m)] + 0.6 * rng.normal(size=(m, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return draw(n), draw(num_queries)


@pytest.fixture(scope="module")
def corpus():
    emb, queries = clustered(30_000, 64, 300)
    ids = np.arange(len(emb), dtype=np.int64) * 3 + 1000
    return emb, queries, ids


@pytest.fixture(scope="module")
def tree_searcher(corpus):
    emb, _, ids = corpus
    return ScannSearcher.build(emb, ids, ScannSettings(num_threads=2))


def test_tree_ah_recall(corpus, tree_searcher):
    emb, queries, ids = corpus
    settings = tree_searcher.settings
    assert settings["mode"] == "tree_ah_reorder"
    assert settings["num_leaves"] == 346 and settings["leaves_to_search"] == 18  # 2 sqrt(N), 5%
    assert settings["soar_lambda"] == 1.5
    assert settings["anisotropic_quantization_threshold"] == 0.2
    # 80% of the variance needs more than half of the 64 dims: no projection.
    assert principal_dims(emb, 0.8) > 32 and settings["pca_dims"] == 64
    assert isinstance(tree_searcher, base.Searcher)
    assert tree_searcher.size == 30_000 and tree_searcher.dim == 64
    scores, found = tree_searcher.search(queries, 10)
    true_scores, true_ids = base.exact_search(queries, emb, 10, ids)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    assert base.recall_at_k(found, true_ids) >= 0.95
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # Reordered scores are exact dot products of the returned rows.
    rows = (found - 1000) // 3
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, emb[rows]), atol=1e-5)


def test_principal_dims():
    # Independent coordinates with variances 4, 3, 2, 1 (shares 0.4, 0.3, 0.2, 0.1), rotated.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200_000, 4)) * np.sqrt([4.0, 3.0, 2.0, 1.0])
    x = x @ np.linalg.qr(rng.normal(size=(4, 4)))[0]
    assert [principal_dims(x, v) for v in (0.3, 0.65, 0.75, 0.85, 0.95, 1.0)] == [1, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="pca_variance"):
        principal_dims(x, 1.5)


def test_pca_on_a_concentrated_corpus(tmp_path):
    # Clusters in 64 dims whose last 48 coordinates are shrunk: most of the variance lies
    # in 16 dims, so the tree and the hashing work on a projection.
    emb, queries = clustered(20_000, 64, 200, seed=2)
    scale = np.where(np.arange(64) < 16, 1.0, 0.25).astype(np.float32)
    emb, queries = (x * scale / np.linalg.norm(x * scale, axis=1, keepdims=True)
                    for x in (emb, queries))
    searcher = ScannSearcher.build(emb, settings=ScannSettings(num_threads=1))
    assert searcher.settings["pca_dims"] == principal_dims(emb, 0.8) <= 32
    scores, found = searcher.search(queries, 10)
    assert base.recall_at_k(found, base.exact_search(queries, emb, 10)[1]) >= 0.95
    # The reorder scores the full vectors.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, emb[found]), atol=1e-5)
    searcher.serialize(tmp_path)
    for got, want in zip(ScannSearcher.load(tmp_path).search(queries, 10), (scores, found)):
        np.testing.assert_array_equal(got, want)
    # pca_variance=None: the full vectors throughout.
    plain = ScannSearcher.build(emb, settings=ScannSettings(num_threads=1, pca_variance=None))
    assert plain.settings["pca_dims"] == 64


def test_serialize_round_trip(tmp_path, corpus, tree_searcher):
    _, queries, ids = corpus
    tree_searcher.serialize(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")  # relative asset paths: the folder can move
    loaded = ScannSearcher.load(tmp_path / "b", ids, num_threads=1)
    assert loaded.settings["num_leaves"] == tree_searcher.settings["num_leaves"]
    for got, want in zip(loaded.search(queries, 10), tree_searcher.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(FileNotFoundError, match="realm_scann_settings.json"):
        ScannSearcher.load(tmp_path)


def test_brute_force_is_exact():
    emb, queries = clustered(2_000, 32, 20, seed=1, clusters=20)
    searcher = ScannSearcher.build(emb, settings=ScannSettings(num_threads=1))
    assert searcher.settings["mode"] == "brute_force"
    scores, ids = searcher.search(queries, 10)
    true_scores, true_ids = base.exact_search(queries, emb, 10)
    np.testing.assert_array_equal(ids, true_ids)
    np.testing.assert_allclose(scores, true_scores, atol=1e-5)
    # More neighbours than vectors: empty slots are (-inf, -1).
    small = ScannSearcher.build(emb[:5], settings=ScannSettings(num_threads=1))
    scores, ids = small.search(queries[:2], 8)
    assert sorted(ids[0, :5]) == list(range(5))
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
