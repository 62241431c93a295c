"""Approximate maximum-inner-product search on the host with ScaNN.

Below a size threshold the searcher is exact (brute force). Above it: a k-means tree with
about 2 sqrt(N) leaves (a fraction of them searched per query), each vector also spilled to
a second leaf chosen by SOAR (orthogonality-amplified residuals, Sun et al. 2023), anisotropic
asymmetric hashing of the residuals, and an exact float re-scoring (reorder) of the best
candidates. The tree and the hashing may work on the corpus's leading principal components
(PCA); the reorder always scores the full vectors. The resolved settings are kept as a plain
dict, so a snapshot manifest can record them, and the searcher is serialized into a folder
with relative paths (the folder can be moved).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from realm_jax.index import base

SETTINGS_FILE = "realm_scann_settings.json"
MAX_TRAINING_SAMPLE = 1_000_000
PCA_SAMPLE = 100_000  # rows the principal components' count is chosen on


@dataclasses.dataclass(frozen=True)
class ScannSettings:
    """How to build a ScaNN searcher; None fields are resolved from the corpus size.

    num_leaves: tree leaves (default leaves_per_sqrt * sqrt(N)); leaves_to_search: leaves
    probed per query (default leaves_fraction of them, at least min_leaves_to_search);
    soar_lambda: SOAR spilling of every vector to a second leaf (None: one leaf each);
    training_sample_size: vectors the tree's k-means trains on (default all, at most
    MAX_TRAINING_SAMPLE: more training vectors place the leaves better);
    pca_variance, pca_max_fraction: the tree and the hashing work on the fewest principal
    components holding a pca_variance share of the corpus's variance when they are at most
    pca_max_fraction of its dimensions (pca_variance None: always on the full vectors); the
    reorder re-scores full vectors. Embeddings of text concentrate their variance in few
    directions and search faster projected; vectors with isotropic noise need most of
    their dimensions, and projected they lose recall (hence the fraction; the measurements
    behind these defaults: docs/experiments.md);
    reorder: candidates re-scored exactly; brute_force_below: corpora smaller than this are
    searched exactly. num_threads: search threads (0: all cores).
    """

    num_neighbors: int = 10
    brute_force_below: int = 20_000
    num_leaves: int | None = None
    leaves_per_sqrt: float = 2.0
    leaves_to_search: int | None = None
    leaves_fraction: float = 0.05
    soar_lambda: float | None = 1.5
    min_leaves_to_search: int = 8
    training_sample_size: int | None = None
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    pca_variance: float | None = 0.8
    pca_max_fraction: float = 0.5
    reorder: int = 100
    num_threads: int = 0

    def resolve(self, n: int, dim: int) -> dict[str, Any]:
        """The settings actually used for a corpus of n vectors of size dim."""
        common = {"num_neighbors": self.num_neighbors, "num_threads": self.num_threads,
                  "count": n, "dim": dim}
        if n < self.brute_force_below:
            return {"mode": "brute_force", **common}
        leaves = self.num_leaves or max(2, int(round(self.leaves_per_sqrt * math.sqrt(n))))
        search = self.leaves_to_search or min(
            leaves, max(self.min_leaves_to_search, int(math.ceil(leaves * self.leaves_fraction))))
        return {
            "mode": "tree_ah_reorder", **common,
            "num_leaves": leaves,
            "leaves_to_search": search,
            "soar_lambda": self.soar_lambda,
            "training_sample_size": self.training_sample_size or min(n, MAX_TRAINING_SAMPLE),
            "dims_per_block": self.dims_per_block,
            "anisotropic_quantization_threshold": self.anisotropic_quantization_threshold,
            "pca_variance": self.pca_variance,
            "pca_max_fraction": self.pca_max_fraction,
            "reorder": max(self.reorder, self.num_neighbors),
        }

    def projected_dims(self, vectors: np.ndarray) -> int:
        """The dimensions the tree and the hashing work on for these vectors [N, P]."""
        dim = vectors.shape[1]
        if self.pca_variance is None:
            return dim
        dims = principal_dims(vectors, self.pca_variance)
        return dims if dims <= self.pca_max_fraction * dim else dim


def _scann_ops():
    from scann.scann_ops.py import scann_ops_pybind  # heavy import, only when used
    return scann_ops_pybind


def principal_dims(vectors: np.ndarray, variance: float, seed: int = 0) -> int:
    """The fewest principal components of `vectors` (on a sample of at most PCA_SAMPLE rows)
    holding a `variance` share of their total variance."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"pca_variance must be in (0, 1], got {variance}")
    if len(vectors) > PCA_SAMPLE:
        rows = np.random.default_rng(seed).choice(len(vectors), PCA_SAMPLE, replace=False)
        vectors = vectors[np.sort(rows)]
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    eigenvalues = np.linalg.eigvalsh(centred.T @ centred)[::-1].clip(min=0.0)
    shares = np.cumsum(eigenvalues) / max(eigenvalues.sum(), np.finfo(np.float64).tiny)
    return int(min(len(shares), np.searchsorted(shares, variance - 1e-9) + 1))


def _threads(num_threads: int) -> int:
    return num_threads if num_threads > 0 else (os.cpu_count() or 1)


class ScannSearcher:
    """ScaNN searcher behind the `Searcher` interface (dot-product scores)."""

    def __init__(self, searcher: Any, settings: dict[str, Any], ids: np.ndarray | None = None):
        self._searcher = searcher
        self.settings = dict(settings)
        self._ids = base.check_ids(ids, self.size)
        self.set_num_threads(int(settings.get("num_threads", 0)))

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: np.ndarray | None = None,
              settings: ScannSettings | None = None) -> "ScannSearcher":
        """Build over embeddings [N, P] (any float dtype; ScaNN works in float32)."""
        settings = settings or ScannSettings()
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"ScannSearcher.build: embeddings must be a non-empty [N, P] "
                             f"matrix, got shape {embeddings.shape}")
        n, dim = embeddings.shape
        db = np.ascontiguousarray(embeddings, dtype=np.float32)
        resolved = settings.resolve(n, dim)
        builder = _scann_ops().builder(db, resolved["num_neighbors"], "dot_product")
        builder = builder.set_n_training_threads(_threads(resolved["num_threads"]))
        if resolved["mode"] == "brute_force":
            builder = builder.score_brute_force()
        else:
            resolved["pca_dims"] = settings.projected_dims(db)
            if resolved["pca_dims"] < dim:
                builder = builder.pca(reduction_dim=resolved["pca_dims"],
                                      pca_significance_threshold=None)
            builder = builder.tree(
                num_leaves=resolved["num_leaves"],
                num_leaves_to_search=resolved["leaves_to_search"],
                training_sample_size=resolved["training_sample_size"],
                soar_lambda=resolved["soar_lambda"])
            builder = builder.score_ah(
                resolved["dims_per_block"],
                anisotropic_quantization_threshold=resolved["anisotropic_quantization_threshold"])
            builder = builder.reorder(resolved["reorder"])
        return cls(builder.build(), resolved, ids)

    @classmethod
    def load(cls, directory: str | os.PathLike, ids: np.ndarray | None = None,
             num_threads: int | None = None) -> "ScannSearcher":
        """Load a searcher written by `serialize` (ids are not stored by ScaNN: pass them)."""
        directory = os.fspath(directory)
        settings_path = os.path.join(directory, SETTINGS_FILE)
        if not os.path.isfile(settings_path):
            raise FileNotFoundError(f"no ScaNN searcher in {directory}: {SETTINGS_FILE} missing")
        with open(settings_path) as f:
            settings = json.load(f)
        if num_threads is not None:
            settings["num_threads"] = num_threads
        searcher = _scann_ops().load_searcher(directory, assets_backcompat_shim=False)
        loaded = cls(searcher, settings, ids)
        if loaded.size != settings["count"]:
            raise ValueError(f"ScaNN searcher in {directory} holds {loaded.size} vectors, "
                             f"{SETTINGS_FILE} says count={settings['count']}")
        return loaded

    def serialize(self, directory: str | os.PathLike) -> None:
        """Write the ScaNN artifacts (relative paths) and the settings into `directory`."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._searcher.serialize(directory, relative_path=True)
        with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
            json.dump(self.settings, f, indent=1, sort_keys=True)

    def set_num_threads(self, num_threads: int) -> None:
        """Threads for batched search (0: all cores)."""
        self.settings["num_threads"] = int(num_threads)
        self._searcher.set_num_threads(_threads(int(num_threads)))

    @property
    def size(self) -> int:
        return int(self._searcher.size())

    @property
    def dim(self) -> int:
        return int(self.settings["dim"])

    def search(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
               reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k; leaves_to_search/reorder override the built defaults (recall vs speed)."""
        queries = base.check_queries(queries, self.dim, k)
        k = int(k)
        kwargs: dict[str, Any] = {"final_num_neighbors": k}
        if self.settings["mode"] != "brute_force":
            kwargs["pre_reorder_num_neighbors"] = max(reorder or self.settings["reorder"], k)
            if leaves_to_search:
                kwargs["leaves_to_search"] = int(leaves_to_search)
        if _threads(self.settings["num_threads"]) > 1 and len(queries) > 1:
            rows, scores = self._searcher.search_batched_parallel(queries, **kwargs)
        else:
            rows, scores = self._searcher.search_batched(queries, **kwargs)
        # (ScaNN may return fewer than k)
        scores, rows = base.pad_to_k(np.asarray(scores, np.float32),
                                     np.asarray(rows).astype(np.int64), k)
        empty = ~np.isfinite(scores) | (rows >= self.size)
        scores = np.where(empty, -np.inf, scores).astype(np.float32)
        rows = np.where(empty, base.NO_ID, rows)
        return scores, base.map_ids(rows, self._ids)
