"""RAG-Sequence and RAG-Token negative log-likelihoods (Lewis et al., 2020), as pure JAX
functions of the generator's per-document logits, the targets and the retrieval scores.

Shapes: B questions, K retrieved documents, T target positions, V vocabulary entries.

    logits      [B, K, T, V]  generator logits, one row per (question, document) pair
    targets     [B, T]        the label of position t (already aligned with the logits);
                              positions equal to `pad_id` are masked out
    doc_scores  [B, K]        unnormalized retrieval scores; log p(z|x) = log_softmax over K

A generator output in Hugging Face RAG's [B * K, ...] layout becomes [B, K, ...] with
`split_docs`; `shift_targets` makes the targets from the decoder inputs, as Hugging Face's
loss does inside.

    RAG-Sequence  -log sum_z p(z|x) prod_t p(y_t|x, z, y_<t)
    RAG-Token     -sum_t log sum_z p(z|x) p(y_t|x, z, y_<t)

Label smoothing with eps mixes in a smoothing term built the same way, with the sum of the
log-probabilities over the vocabulary in place of the target's log-probability:
loss = (1 - eps) * nll + (eps / V) * smooth.

`exclude_bos_score` drops target position 0 (the forced bos of a generated hypothesis)
from the nll, never from the smoothing term. Everything is computed in float32.

One deliberate difference from transformers' RagSequenceForGeneration: it adds log p(z|x)
at target position 1 (so that dropping position 0 keeps it), which loses the prior when
position 1 is a pad (a row with a single scored target, or T = 1). Here the prior counts
once per document whatever the padding; all other cases agree.
"""

from __future__ import annotations

from numbers import Real

import jax
import jax.numpy as jnp

from realm_jax.objectives.realm import target_log_probs

Array = jax.Array

__all__ = [
    "doc_log_probs", "marginalize_token_logprobs", "rag_sequence_nll", "rag_token_nll",
    "scored_positions", "sequence_log_likelihoods", "shift_targets", "split_docs",
]


def split_docs(x: Array, n_docs: int) -> Array:
    """[B * K, ...] with the K documents of a question contiguous -> [B, K, ...]."""
    if x.shape[0] % n_docs:
        raise ValueError(f"leading dimension {x.shape[0]} is not a multiple of n_docs={n_docs}")
    return x.reshape((x.shape[0] // n_docs, n_docs) + x.shape[1:])


def shift_targets(decoder_input_ids: Array, pad_id: int) -> Array:
    """Labels aligned with the decoder's outputs: position t gets decoder input t + 1, and
    the last position gets `pad_id` (so it is not scored). [B, T] -> [B, T]."""
    pad = jnp.full_like(decoder_input_ids[:, :1], pad_id)
    return jnp.concatenate([decoder_input_ids[:, 1:], pad], axis=1)


def doc_log_probs(doc_scores: Array) -> Array:
    """log p(z|x): log-softmax of the retrieval scores over the documents. [B, K] -> [B, K]."""
    return jax.nn.log_softmax(doc_scores.astype(jnp.float32), axis=-1)


def marginalize_token_logprobs(logits: Array, doc_scores: Array) -> Array:
    """RAG-Token's marginal next-token log-distribution log sum_z p(z|x) p(v|x, z, ...):
    [B, K, ..., V] logits, [B, K] scores -> [B, ..., V], for whole sequences ([B, K, T, V])
    and single decoding steps ([B, K, V]) alike."""
    lp_z = doc_log_probs(doc_scores)
    lp_z = lp_z.reshape(lp_z.shape + (1,) * (logits.ndim - 2))
    return jax.nn.logsumexp(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) + lp_z, axis=1)


def _check(logits: Array, targets: Array, doc_scores: Array) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, K, T, V], got shape {logits.shape} "
                         "(split a [B * K, T, V] generator output with split_docs)")
    b, k, t, _ = logits.shape
    if targets.shape != (b, t):
        raise ValueError(f"targets {targets.shape} do not match logits {logits.shape}: "
                         f"want {(b, t)}")
    if doc_scores.shape != (b, k):
        raise ValueError(f"doc_scores {doc_scores.shape} do not match logits {logits.shape}: "
                         f"want {(b, k)}")


def _is_zero(x: float | Array) -> bool:
    return isinstance(x, Real) and x == 0


def scored_positions(targets: Array, pad_id: int, exclude_bos_score: bool,
                     bos_id: int | None) -> tuple[Array, Array]:
    """(positions scored by the nll, positions scored by the smoothing term), both [B, T]."""
    mask = targets != pad_id
    if not exclude_bos_score:
        return mask, mask
    first = jnp.arange(targets.shape[1]) == 0
    if bos_id is not None:   # Hugging Face drops position 0 only if every row starts with bos
        first = first & jnp.all(targets[:, 0] == bos_id)
    return mask & ~first[None, :], mask


def _scored(logits: Array, targets: Array, doc_scores: Array, pad_id: int,
            exclude_bos_score: bool, bos_id: int | None
            ) -> tuple[Array, Array, Array, Array, Array]:
    """After checking the shapes: (float32 logits, log p(z|x) [B, K], log p(y_t|x, z, y_<t)
    [B, K, T], the nll's and the smoothing term's positions [B, T])."""
    _check(logits, targets, doc_scores)
    logits = logits.astype(jnp.float32)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)                   # e.g. pad_id=-100
    return (logits, doc_log_probs(doc_scores), target_log_probs(logits, safe),
            *scored_positions(targets, pad_id, exclude_bos_score, bos_id))


def _finish(nll: Array, smooth: Array | None, epsilon: float | Array, vocab: int,
            reduce: bool) -> Array:
    loss = nll if smooth is None else (1.0 - epsilon) * nll + (epsilon / vocab) * smooth
    return jnp.sum(loss) if reduce else loss


def rag_sequence_nll(logits: Array, targets: Array, doc_scores: Array, *, pad_id: int,
                     epsilon: float | Array = 0.0, exclude_bos_score: bool = False,
                     bos_id: int | None = None, reduce: bool = True) -> Array:
    """RAG-Sequence loss: -logsumexp_z(log p(z|x) + sum_t log p(y_t|x, z, y_<t)), pads masked
    (`pad_id` may lie outside the vocabulary, e.g. -100).

    epsilon: label smoothing; the smoothing term is -logsumexp_z(V log p(z|x) +
    sum_t sum_v log p(v|x, z, y_<t)) (log p(z|x) added to every vocabulary entry).
    bos_id: if given, `exclude_bos_score` applies only when every row's target 0 is `bos_id`
    (Hugging Face's batch-wide check); if None, it always applies. reduce: the sum over the
    batch, else the [B] per-question losses (float32).
    """
    logits, lp_z, tok, nll_mask, smooth_mask = _scored(logits, targets, doc_scores, pad_id,
                                                       exclude_bos_score, bos_id)
    vocab = logits.shape[-1]
    nll = -jax.nn.logsumexp(_sequence_ll(tok, nll_mask) + lp_z, axis=1)
    smooth = None
    if not _is_zero(epsilon):
        # sum_v log p(v|x, z, y_<t), without materializing the log-probabilities
        vocab_sum = jnp.sum(logits, axis=-1) - vocab * jax.nn.logsumexp(logits, axis=-1)
        seq_smooth = jnp.sum(jnp.where(smooth_mask[:, None, :], vocab_sum, 0.0), axis=-1)
        smooth = -jax.nn.logsumexp(seq_smooth + vocab * lp_z, axis=1)
    return _finish(nll, smooth, epsilon, vocab, reduce)


def _sequence_ll(tok: Array, nll_mask: Array) -> Array:
    """[B, K] the target's log-likelihood under each document: token log-probs [B, K, T]
    summed over the scored positions [B, T]."""
    return jnp.sum(jnp.where(nll_mask[:, None, :], tok, 0.0), axis=-1)


def sequence_log_likelihoods(logits: Array, targets: Array, *, pad_id: int,
                             exclude_bos_score: bool = False, bos_id: int | None = None
                             ) -> Array:
    """[B, K] log p(y|x, z_k): the generator's log-likelihood of the target under each
    document alone, the per-document term of the RAG-Sequence loss (the same positions
    scored); what the distillation retriever losses (objectives/distill.py) pull towards."""
    _, _, tok, nll_mask, _ = _scored(logits, targets, jnp.zeros(logits.shape[:2]), pad_id,
                                     exclude_bos_score, bos_id)
    return _sequence_ll(tok, nll_mask)


def rag_token_nll(logits: Array, targets: Array, doc_scores: Array, *, pad_id: int,
                  epsilon: float | Array = 0.0, exclude_bos_score: bool = False,
                  bos_id: int | None = None, reduce: bool = True) -> Array:
    """RAG-Token loss: -sum_t logsumexp_z(log p(z|x) + log p(y_t|x, z, y_<t)), pads masked.

    Arguments as for `rag_sequence_nll`; the smoothing term is -sum_t sum_v of the
    marginal log-distribution (`marginalize_token_logprobs`). `exclude_bos_score` (which
    Hugging Face's RAG-Token loss does not offer) leaves position 0 out of the nll.
    """
    logits, lp_z, tok, nll_mask, smooth_mask = _scored(logits, targets, doc_scores, pad_id,
                                                       exclude_bos_score, bos_id)
    vocab = logits.shape[-1]
    tok_marginal = jax.nn.logsumexp(tok + lp_z[:, :, None], axis=1)         # [B, T]
    nll = -jnp.sum(jnp.where(nll_mask, tok_marginal, 0.0), axis=-1)
    smooth = None
    if not _is_zero(epsilon):
        vocab_sum = jnp.sum(marginalize_token_logprobs(logits, doc_scores), axis=-1)  # [B, T]
        smooth = -jnp.sum(jnp.where(smooth_mask, vocab_sum, 0.0), axis=-1)
    return _finish(nll, smooth, epsilon, vocab, reduce)
