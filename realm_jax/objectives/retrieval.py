"""In-batch softmax losses of retriever training: ICT (ORQA) and DPR.

Each query is scored against every context of the batch by inner product, times ``scale``
(a temperature of ``1 / scale``), and the loss is the softmax cross-entropy of its positive
among all of them:

    ICT  queries [B, P], contexts [B, P]: query i's positive is context i (the diagonal).
    DPR  queries [B, P], passages [B * (1 + h), P], laid out per question as its positive
         then its h hard negatives: question i's positive is passage i * (1 + h); the other
         questions' positives and hard negatives are its in-batch negatives.

Under ``jax.jit`` with the batch sharded along the data axis, ``queries @ contexts.T`` is a
product of two sharded arrays: XLA gathers the contexts, so every query is compared with
the contexts of the global batch and the negatives grow with the number of devices.

Padding rows (a last, partial batch) are left out with ``query_valid`` (their loss and
metrics count nothing) and ``context_valid`` (no query puts mass on them).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class RetrievalLoss(NamedTuple):
    """What the in-batch losses return (a pytree, fine as a jit output)."""

    loss: Array       # [] mean nll over the valid queries
    accuracy: Array   # [] fraction of valid queries whose positive scores highest
    mean_rank: Array  # [] mean 1-based rank of the positive (1 is best)
    mrr: Array        # [] mean reciprocal rank
    nll: Array        # [B] per query (0 for invalid queries)
    rank: Array       # [B] 1-based rank of each query's positive among the valid contexts
    logits: Array     # [B, N] scale * scores, invalid contexts at -inf


def in_batch_softmax(queries: Array, contexts: Array, positives: Array, *, scale: float = 1.0,
                     query_valid: Array | None = None, context_valid: Array | None = None
                     ) -> RetrievalLoss:
    """Softmax cross-entropy of each query's positive context (``positives`` [B], indices
    into ``contexts``) among all contexts [N, P] (the whole batch's), over the logits
    ``scale * queries @ contexts.T``. ``query_valid`` [B] / ``context_valid`` [N]: False for
    padding. The rank counts the valid contexts scoring strictly higher than the positive,
    plus one (ties favour the positive).
    """
    queries = jnp.asarray(queries, jnp.float32)
    contexts = jnp.asarray(contexts, jnp.float32)
    if queries.ndim != 2 or contexts.ndim != 2 or queries.shape[1] != contexts.shape[1]:
        raise ValueError(f"need queries [B, P] and contexts [N, P], got {queries.shape} and "
                         f"{contexts.shape}")
    b = queries.shape[0]
    positives = jnp.asarray(positives, jnp.int32)
    logits = scale * (queries @ contexts.T)
    query_valid = jnp.ones(b, bool) if query_valid is None else jnp.asarray(query_valid, bool)
    if context_valid is not None:
        logits = jnp.where(jnp.asarray(context_valid, bool)[None, :], logits, -jnp.inf)
    positive_logit = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=1) - positive_logit
    nll = jnp.where(query_valid, nll, 0.0)
    rank = 1 + (logits > positive_logit[:, None]).sum(axis=1)
    count = jnp.maximum(query_valid.sum(), 1)
    mean = lambda x: jnp.where(query_valid, x, 0).sum() / count  # noqa: E731
    return RetrievalLoss(loss=nll.sum() / count, accuracy=mean((rank == 1).astype(jnp.float32)),
                         mean_rank=mean(rank.astype(jnp.float32)),
                         mrr=mean(1.0 / rank.astype(jnp.float32)), nll=nll, rank=rank,
                         logits=logits)


def ict_loss(queries: Array, contexts: Array, *, scale: float = 1.0,
             valid: Array | None = None) -> RetrievalLoss:
    """ICT: queries [B, P] against contexts [B, P], query i's positive is context i.
    ``valid`` bool [B] marks real examples (a padding example is neither query nor
    negative)."""
    b = queries.shape[0]
    if contexts.shape[0] != b:
        raise ValueError(f"ICT needs one context per query: queries {queries.shape}, "
                         f"contexts {contexts.shape}")
    return in_batch_softmax(queries, contexts, jnp.arange(b), scale=scale, query_valid=valid,
                            context_valid=valid)


def dpr_loss(questions: Array, passages: Array, *, scale: float = 1.0,
             question_valid: Array | None = None, passage_valid: Array | None = None
             ) -> RetrievalLoss:
    """DPR: questions [B, P] against passages [B * (1 + h), P] (each question's positive,
    then its h hard negatives); -log softmax of the positive among all passages of the
    batch. ``passage_valid`` bool [B * (1 + h)] leaves out missing hard negatives and
    padding; ``question_valid`` bool [B] padding questions."""
    b, n = questions.shape[0], passages.shape[0]
    if b == 0 or n % b:
        raise ValueError(f"DPR needs B * (1 + h) passages for B questions: questions "
                         f"{questions.shape}, passages {passages.shape}")
    return in_batch_softmax(questions, passages, jnp.arange(b, dtype=jnp.int32) * (n // b),
                            scale=scale, query_valid=question_valid,
                            context_valid=passage_valid)
