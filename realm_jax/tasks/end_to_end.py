"""End-to-end retriever training in fine-tuning (ORQA, RAG): what the tasks share to train
the document tower (`model.train_doc_tower`) and live with an index that goes stale
(`retrieval.strategy`), and the drift hook.

Strategies (Atlas, Izacard et al. 2022, compared these ways):

- "query_side": the document tower frozen (the ORQA and RAG papers); the index's
  embeddings score the retrieved documents.
- "refresh": a `doc_tower` part is trained; the retrieved documents are re-embedded by the
  live document tower inside the step, so the loss reaches it; the refresher re-embeds the
  corpus from the run's checkpoints (model.json names the part) and the trainer swaps newer
  snapshots in at step boundaries (tasks.common.SnapshotSwaps).
- "rerank": trained too; the stale index proposes `retrieval.over_retrieve` documents, the
  live document tower embeds them and the best by live score are kept; the index is never
  refreshed.

Drift (`retrieval.drift_every`): on fixed probe questions, the overlap@k of the served
index's top k with the live towers' exact top k over the index's best max(over_retrieve,
depth) documents freshly embedded (index.drift.measure_drift), logged beside the staleness
and written to WORKDIR/drift.json, which the refresher's `refresh.min_overlap` reads.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from realm_jax.index.drift import measure_drift
from realm_jax.index.rerank import rerank
from realm_jax.models import EmbedderConfig
from realm_jax.tasks.common import SnapshotSwaps, apply_model, in_padded_batches

DOC_TOWER = "doc_tower"    # the trainable document tower's part (model.train_doc_tower)
STRATEGIES = ("query_side", "refresh", "rerank")


def check_config(config: ml_collections.ConfigDict, depth: int, depth_field: str) -> None:
    """The strategy's fields, each error naming its field: a known strategy, the document
    tower trained exactly when the strategy re-embeds, `retrieval.over_retrieve` at least
    the `depth` documents kept (`depth_field`), drift only against a live document tower."""
    rc, name, trains = config.retrieval, config.retrieval.strategy, config.model.train_doc_tower
    if name not in STRATEGIES:
        raise ValueError(f"retrieval.strategy={name!r}: expected one of {', '.join(STRATEGIES)}")
    if trains != (name != "query_side"):
        raise ValueError(f"retrieval.strategy={name!r} with model.train_doc_tower={trains}: "
                         "'refresh' and 'rerank' train the document tower (set "
                         "model.train_doc_tower=True), 'query_side' keeps it frozen")
    if name == "rerank" and rc.over_retrieve < depth:
        raise ValueError(f"retrieval.strategy='rerank': retrieval.over_retrieve "
                         f"({rc.over_retrieve}) must be >= {depth_field} ({depth})")
    if rc.drift_every > 0 and not trains:
        raise ValueError("retrieval.drift_every: drift is measured against the live document "
                         "tower (retrieval.strategy 'refresh' or 'rerank')")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Which documents the stale index proposes and which are kept (pure jnp methods)."""

    name: str = "query_side"
    over_retrieve: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Strategy":
        return cls(config.retrieval.strategy, config.retrieval.over_retrieve)

    @property
    def live_docs(self) -> bool:
        """Whether the kept documents are scored by the live document tower (else the
        index's embeddings)."""
        return self.name != "query_side"

    def pool_depth(self, depth: int) -> int:
        """Documents the index proposes to keep `depth`: over_retrieve under "rerank"."""
        return max(self.over_retrieve, depth) if self.name == "rerank" else depth

    def probe_depth(self, depth: int) -> int:
        """The pool the drift's exact search ranks afresh."""
        return max(self.over_retrieve, depth)

    def choose(self, pool: jax.Array, embed: Callable[[jax.Array], jax.Array],
               questions: jax.Array, depth: int) -> jax.Array:
        """Rows [B, depth] kept of the index's proposals `pool` [B, R] (best first): its
        first ("query_side", "refresh"), or ("rerank") the best by live score of the
        questions [B, P] against `embed(pool)` [B, R, P] (no gradient)."""
        if self.name != "rerank":
            return pool[:, :depth]
        return live_top(pool, jax.lax.stop_gradient(embed(pool)),
                        jax.lax.stop_gradient(questions), depth).ids


def live_top(pool: jax.Array, docs: jax.Array, questions: jax.Array, k: int):
    """index.rerank's best min(k, R) of `pool` [B, R] by questions [B, P] . docs [B, R, P]."""
    return rerank(pool, docs, questions, min(k, pool.shape[1]))


def embed_docs(config: EmbedderConfig, params, ids: jax.Array, mask: jax.Array,
               rng: jax.Array | None = None) -> jax.Array:
    """[B, R, P] the document tower over rows `ids`, `mask` [B, R, L] (dropout with `rng`)."""
    b, r, length = ids.shape
    out = apply_model(config, params, ids.reshape(b * r, length), mask.reshape(b * r, length),
                      rng=rng)
    return out.reshape(b, r, -1)


class DriftProbe:
    """The drift hook (module docstring) over `questions` (padded batches of `batch_size`):
    `rows(questions, params)` gives each question's (served top k, live exact top k) ids;
    logs index.drift's metrics with the served index's staleness and writes the overlap to
    WORKDIR/drift.json (process 0)."""

    def __init__(self, questions: Sequence[str], batch_size: int,
                 rows: Callable[[list[str], object], list[tuple[np.ndarray, np.ndarray]]],
                 swaps: SnapshotSwaps, workdir):
        self.questions, self.batch_size = list(questions), batch_size
        self.rows, self.swaps, self.workdir = rows, swaps, workdir

    def __call__(self, step: int, params) -> dict:
        pairs = in_padded_batches(self.questions, self.batch_size,
                                  lambda batch: self.rows(batch, params))
        served, exact = (np.stack(x) for x in zip(*pairs))
        values = dict(measure_drift(served, exact).metrics(), **self.swaps.step_metrics(step))
        snapshot = self.swaps.snapshot
        if jax.process_index() == 0:
            self.workdir.write_drift(step=step, index=snapshot.version, index_step=snapshot.step,
                                     overlap=values["drift/overlap"])
        return values


def question_batch(arrays: dict, batch_sharding) -> dict:
    """Global arrays of `batch_sharding` from whole arrays every process holds."""
    return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda index, v=v: v[index])
            for k, v in arrays.items()}

