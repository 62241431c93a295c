"""The REALM pre-training objective: marginal masked-LM likelihood over retrieved documents.

For a query x with masked tokens y_1..y_M and candidates z_0..z_{K-1} (z_0 the null, empty,
document)::

    log p(y_j | x) = logsumexp_k( log p(z_k | x) + log p(y_j | x, z_k) ),
    p(z_k | x)     = softmax_k(retrieval_logits),

averaged over the valid masked tokens of the batch (the reference implementation's
``sum / count`` over tokens, so longer masks weigh more). ``retrieval_utility`` is
``log p(y_j | x) - log p(y_j | x, z_0)``, averaged the same way: how much retrieval helps
over reading the query alone.

The null document's retrieval logit. REALM's example generator prepends an empty document
(no title, no body) to the candidates; it is embedded by the live document tower like any
other candidate, so its score is ``Embed_q(x) . Embed_d([CLS] [SEP] [SEP])`` and is trained.
Callers build that column themselves (``retrieval_logits[:, 0]``), or use
:func:`prepend_null_score` for a fixed score (0.0 by default: a document whose embedding is
the zero vector).

Host (numpy) and device (jax) both work for :func:`exclude_source` and
:func:`reader_inputs`: numpy in, numpy out (the host pipeline); jax in, jax out (a jitted
step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NULL_ID = -1


class RealmLoss(NamedTuple):
    """What :func:`realm_loss` returns (a pytree, fine as a jit output)."""

    loss: Array                 # [] -mean of the marginal log-likelihood over valid tokens
    retrieval_utility: Array    # [] mean of marginal - null-document log-likelihood
    marginal_log_probs: Array   # [B, M] log p(y_j | x) (0 at invalid tokens)
    null_log_probs: Array       # [B, M] log p(y_j | x, z_0) (0 at invalid tokens)
    retrieval_log_probs: Array  # [B, K] log p(z_k | x) (-inf at invalid candidates)
    num_tokens: Array           # [] number of valid masked tokens


def array_module(*arrays: Any) -> Any:
    """numpy when every input is a numpy array (or scalar), else jax.numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def target_log_probs(logits: Array, targets: Array) -> Array:
    """log p(target) under ``logits``: [B, K, M, V] logits with [B, M] targets -> [B, K, M]
    (also [..., M, V] with targets of shape [..., M]), float32. Never materializes the
    full log-softmax."""
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    if logits.ndim == targets.ndim + 2:  # [B, K, M, V] with [B, M]
        targets = targets[:, None, :]
    targets = jnp.broadcast_to(targets, logits.shape[:-1])
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def prepend_null_score(scores: Array, null_score: float | Array = 0.0) -> Array:
    """[B, K-1] retrieved-candidate scores -> [B, K] with the null document's score first
    (a scalar or a [B] array)."""
    scores = jnp.asarray(scores, jnp.float32)
    null = jnp.broadcast_to(jnp.asarray(null_score, jnp.float32), scores.shape[:1])
    return jnp.concatenate([null[:, None], scores], axis=1)


def realm_loss(retrieval_logits: Array, token_log_probs: Array, mask_valid: Array,
               candidate_valid: Array | None = None) -> RealmLoss:
    """The REALM marginal loss and retrieval utility from retrieval_logits [B, K] (candidate
    0 the null document), token_log_probs [B, K, M] (:func:`target_log_probs`) and mask_valid
    [B, M] (the real masked positions). Invalid candidates (candidate_valid [B, K], fewer
    retrieved than K) get no mass; the null document must be valid. With no valid token in
    the batch, loss and utility are 0.
    """
    logits = jnp.asarray(retrieval_logits, jnp.float32)
    lp = jnp.asarray(token_log_probs, jnp.float32)
    if logits.ndim != 2 or lp.ndim != 3 or lp.shape[:2] != logits.shape:
        raise ValueError(f"need retrieval_logits [B, K] and token_log_probs [B, K, M], got "
                         f"{logits.shape} and {lp.shape}")
    if candidate_valid is not None:
        logits = jnp.where(jnp.asarray(candidate_valid, bool), logits, -jnp.inf)
    retrieval_lp = jax.nn.log_softmax(logits, axis=-1)
    joint = retrieval_lp[:, :, None] + lp                              # [B, K, M]
    marginal = jax.nn.logsumexp(joint, axis=1)                         # [B, M]
    valid = jnp.asarray(mask_valid, bool)
    count = valid.astype(jnp.float32).sum()
    denom = jnp.maximum(count, 1.0)
    marginal = jnp.where(valid, marginal, 0.0)
    null = jnp.where(valid, lp[:, 0], 0.0)
    loss = -marginal.sum() / denom
    utility = (marginal - null).sum() / denom
    return RealmLoss(loss, utility, marginal, null, retrieval_lp, count)


def realm_loss_from_logits(retrieval_logits: Array, mlm_logits: Array, mask_targets: Array,
                           mask_valid: Array, candidate_valid: Array | None = None
                           ) -> RealmLoss:
    """:func:`realm_loss` from the reader's MLM logits [B, K, M, V] and targets [B, M]."""
    return realm_loss(retrieval_logits, target_log_probs(mlm_logits, mask_targets), mask_valid,
                      candidate_valid)


def exclude_source(retrieved_ids: Any, retrieved_docs: Any, source_docs: Any,
                   num_candidates: int, *, null_id: int = NULL_ID) -> tuple[Any, Any]:
    """Drops the retrieved blocks ([B, R] ids, best first, negative for empty slots) whose
    key (retrieved_docs [B, R]) is the query's source key (source_docs [B]), keeps the best
    ``num_candidates - 1`` others (K, the null document included: 8 in REALM) and puts the
    null document first. The keys are block ids (only the block the query came from is
    dropped) or document ordinals (every block of its document).

    Returns (candidate_ids [B, K], candidate_valid [B, K]): column 0 is ``null_id`` and
    valid; slots left over when fewer than K - 1 blocks remain hold ``null_id``, invalid.
    """
    xp = array_module(retrieved_ids, retrieved_docs, source_docs)
    ids = xp.asarray(retrieved_ids)
    docs = xp.asarray(retrieved_docs)
    src = xp.asarray(source_docs)
    if ids.ndim != 2 or docs.shape != ids.shape or src.shape != ids.shape[:1]:
        raise ValueError(f"need retrieved_ids and retrieved_docs [B, R] and source_docs [B], "
                         f"got {ids.shape}, {docs.shape}, {src.shape}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    keep = (docs != src[:, None]) & (ids >= 0)
    want = num_candidates - 1
    if ids.shape[1] < want:  # pad so that there are always want columns to take
        pad = ((0, 0), (0, want - ids.shape[1]))
        ids = xp.pad(ids, pad, constant_values=null_id)
        keep = xp.pad(keep, pad, constant_values=False)
    order = xp.argsort(~keep, axis=1, stable=True)[:, :want]
    valid = xp.take_along_axis(keep, order, axis=1)
    chosen = xp.where(valid, xp.take_along_axis(ids, order, axis=1), null_id)
    batch = ids.shape[0]
    cand = xp.concatenate([xp.full((batch, 1), null_id, dtype=chosen.dtype), chosen], axis=1)
    cand_valid = xp.concatenate([xp.ones((batch, 1), dtype=bool), valid], axis=1)
    return cand, cand_valid


class ReaderInputs(NamedTuple):
    """The reader's inputs, each [B, K, T] int32."""

    input_ids: Any
    attention_mask: Any
    token_type_ids: Any


def reader_inputs(query_ids: Any, query_mask: Any, candidate_ids: Any, candidate_lengths: Any,
                  *, sep_id: int, pad_id: int = 0, length: int | None = None) -> ReaderInputs:
    """``[CLS] query [SEP] candidate [SEP]`` for every candidate, padded to ``length`` (T,
    default Q + C; each candidate is cut to fit ``T - query length - 1`` tokens).

    query_ids [B, Q]: ``[CLS] query [SEP]`` padded, query_mask [B, Q] its attention mask (the
    query is the first ``sum`` tokens); candidate_ids [B, K, C]: block tokens without special
    tokens, candidate_lengths [B, K] (0 for the null document). Token types are 0 over
    ``[CLS] query [SEP]`` and 1 over ``candidate [SEP]``; the query sits first, so the masked
    positions are unchanged.
    """
    xp = array_module(query_ids, query_mask, candidate_ids, candidate_lengths)
    q_ids = xp.asarray(query_ids).astype(xp.int32)
    c_ids = xp.asarray(candidate_ids).astype(xp.int32)
    if q_ids.ndim != 2 or c_ids.ndim != 3 or c_ids.shape[0] != q_ids.shape[0]:
        raise ValueError(f"need query_ids [B, Q] and candidate_ids [B, K, C], got "
                         f"{q_ids.shape} and {c_ids.shape}")
    (_, q_len), (_, _, c_len) = q_ids.shape, c_ids.shape
    t_len = q_len + c_len if length is None else int(length)
    if t_len < q_len + 1:
        raise ValueError(f"reader length {t_len} leaves no room after a {q_len}-token query")
    n_q = xp.asarray(query_mask).astype(xp.int32).sum(axis=1)[:, None, None]      # [B,1,1]
    n_c = xp.minimum(xp.asarray(candidate_lengths).astype(xp.int32)[:, :, None],
                     xp.minimum(t_len - n_q - 1, c_len))                         # [B,K,1]
    t = xp.arange(t_len, dtype=xp.int32)[None, None, :]                             # [1,1,T]
    in_query = t < n_q
    c_pos = t - n_q
    in_cand = (c_pos >= 0) & (c_pos < n_c)
    is_sep = c_pos == n_c
    q_part = xp.take_along_axis(q_ids[:, None, :], xp.clip(t, 0, q_len - 1), axis=2)
    c_part = xp.take_along_axis(c_ids, xp.clip(c_pos, 0, max(c_len - 1, 0)), axis=2) \
        if c_len else xp.zeros_like(c_pos)
    ids = xp.where(in_query, q_part, xp.where(in_cand, c_part, xp.where(is_sep, sep_id, pad_id)))
    second = in_cand | is_sep
    return ReaderInputs(ids.astype(xp.int32), (in_query | second).astype(xp.int32),
                        second.astype(xp.int32))
