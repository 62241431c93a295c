"""Over-retrieve from a stale index, keep the best by the live towers: the re-ranking way
of Atlas' "efficient retriever fine-tuning" (Izacard et al., 2022).

The stale index only proposes R candidates per question (R > k, e.g. 100); the step embeds
them with the live document tower and keeps the k best by the live score, so the retriever
is trained on the documents the live towers prefer. A pure, jittable function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from realm_jax.index.base import NO_ID
from realm_jax.models.towers import relevance_scores

Array = jax.Array

__all__ = ["Reranked", "rerank"]


class Reranked(NamedTuple):
    """The k kept candidates of each question, best live score first."""

    ids: Array      # [B, k] block ids (NO_ID where not valid)
    scores: Array   # [B, k] live scores, differentiable (-inf where not valid)
    valid: Array    # [B, k] bool
    index: Array    # [B, k] int32 positions among the R candidates: gather their tokens or
                    #   embeddings with jnp.take_along_axis(x, index[..., None], axis=1)


def rerank(candidate_ids: Array, doc_embeddings: Array, query_embeddings: Array, k: int, *,
           valid: Array | None = None) -> Reranked:
    """The top k of R over-retrieved candidates by live score.

    Args:
      candidate_ids: [B, R] int block ids from the stale index; negative ids are empty slots.
      doc_embeddings: [B, R, P] the candidates embedded by the live document tower.
      query_embeddings: [B, P] the questions embedded by the live query tower.
      k: how many to keep, 1 <= k <= R (static).
      valid: [B, R] bool, optional; default ``candidate_ids >= 0``. It is and-ed with that.

    Returns:
      :class:`Reranked`. Equal scores keep the stale index's order (lax.top_k is stable);
      invalid candidates come last, and a question with fewer than k valid candidates has
      invalid slots at the end. Gradients reach both embeddings through ``scores``.
    """
    ids = jnp.asarray(candidate_ids)
    if ids.ndim != 2 or doc_embeddings.shape[:2] != ids.shape or query_embeddings.ndim != 2 \
            or query_embeddings.shape != (ids.shape[0], doc_embeddings.shape[2]):
        raise ValueError(f"rerank needs candidate_ids [B, R], doc_embeddings [B, R, P] and "
                         f"query_embeddings [B, P], got {ids.shape}, {doc_embeddings.shape} "
                         f"and {query_embeddings.shape}")
    if not 1 <= k <= ids.shape[1]:
        raise ValueError(f"rerank: k={k} must be in 1..R={ids.shape[1]}")
    ok = ids >= 0
    if valid is not None:
        ok = ok & jnp.asarray(valid, bool)
    scores = relevance_scores(query_embeddings, doc_embeddings).astype(jnp.float32)
    top, index = lax.top_k(jnp.where(ok, scores, -jnp.inf), k)
    kept_valid = jnp.take_along_axis(ok, index, axis=1)
    kept_ids = jnp.where(kept_valid, jnp.take_along_axis(ids, index, axis=1), NO_ID)
    return Reranked(kept_ids, jnp.where(kept_valid, top, -jnp.inf), kept_valid,
                    index.astype(jnp.int32))
