"""Retriever losses that train the retriever towards the reader: the marginal likelihood,
EMDR², perplexity distillation (PDist) and leave-one-out perplexity distillation (LOOP).

Shapes: B questions, K retrieved documents.

    retriever_scores        [B, K]  S(x, z_k); p_retr(z_k|x) = softmax_k(S / retriever_temperature)
    reader_log_likelihoods  [B, K]  log p_reader(y | x, z_k), document k alone
    loo_log_likelihoods     [B, K]  log p_reader(y | x, Z \\ {z_k}), all documents but z_k (LOOP)
    valid                   [B, K]  bool, False for empty slots: no mass on either side, no
                                    gradient

A log-likelihood may be the sum over target tokens (the papers) or the mean per token (Atlas'
code for PDist and LOOP): the caller's choice, which sharpens the target as temperature does.

``reduce``: "mean" over the questions with a valid document (one with none adds 0 and is not
counted), "sum", or "none" ([B]). Computed in float32; the reader side of EMDR², PDist and LOOP
is under ``stop_gradient``, so they train the retriever only.
"""

from __future__ import annotations

from numbers import Real
from typing import NamedTuple

import jax
import jax.numpy as jnp

from realm_jax.objectives.realm import realm_loss

Array = jax.Array

__all__ = [
    "RetrieverLoss", "emdr2_loss", "leave_one_out_marginals", "loop_loss", "marginal_loss",
    "pdist_loss",
]

REDUCTIONS = ("mean", "sum", "none")


class RetrieverLoss(NamedTuple):
    """What the losses of this module return (a pytree, fine as a jit output)."""

    loss: Array                 # [] reduced per `reduce`, or [B] with reduce="none"
    per_example: Array          # [B] (0 for a question with no valid document)
    retriever_log_probs: Array  # [B, K] log p_retr(z_k|x) (-inf at invalid documents)
    target_probs: Array         # [B, K] the distribution the retriever is pulled towards
                                #   (0 at invalid documents; no gradient)
    metrics: dict               # scalars: examples, target_entropy, top1_agreement


def _inputs(scores: Array, reader: Array, valid: Array | None, name: str, **temperatures
            ) -> tuple[Array, Array, Array, Array, Array]:
    """(scores, reader, valid [B, K], kept [B]: rows with a valid document, softmax set
    [B, K]: valid, or every entry of a row with none, so that such a row stays finite and is
    dropped). Whatever an invalid slot holds (nan too) is replaced by 0. Each of
    `temperatures` must be > 0."""
    for field, value in temperatures.items():
        if isinstance(value, Real) and value <= 0:
            raise ValueError(f"{field} must be > 0, got {value}")
    scores = jnp.asarray(scores, jnp.float32)
    reader = jnp.asarray(reader, jnp.float32)
    if scores.ndim != 2 or reader.shape != scores.shape:
        raise ValueError(f"need retriever_scores [B, K] and {name} [B, K], got "
                         f"{scores.shape} and {reader.shape}")
    valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid {valid.shape} does not match retriever_scores {scores.shape}")
    kept = valid.any(-1)
    return (jnp.where(valid, scores, 0.0), jnp.where(valid, reader, 0.0), valid, kept,
            jnp.where(kept[:, None], valid, True))


def _reduce(per_example: Array, kept: Array, reduce: str) -> Array:
    if reduce == "mean":
        return per_example.sum() / jnp.maximum(kept.sum(), 1).astype(jnp.float32)
    if reduce == "sum":
        return per_example.sum()
    if reduce == "none":
        return per_example
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


def _masked_log_softmax(logits: Array, softmax_set: Array) -> Array:
    return jax.nn.log_softmax(jnp.where(softmax_set, logits, -jnp.inf), axis=-1)


def _finish(per_example: Array, kept: Array, valid: Array, retriever_lp: Array,
            target_lp: Array, reduce: str) -> RetrieverLoss:
    """Zeroes dropped rows, reduces, and adds the metrics (means over the kept rows)."""
    per_example = jnp.where(kept, per_example, 0.0)
    target_lp = jax.lax.stop_gradient(target_lp)
    target = jnp.where(valid, jnp.exp(target_lp), 0.0)
    count = jnp.maximum(kept.sum(), 1).astype(jnp.float32)
    entropy = -jnp.sum(jnp.where(valid, target * target_lp, 0.0), axis=-1)
    agree = jnp.argmax(jnp.where(valid, retriever_lp, -jnp.inf), -1) == jnp.argmax(target, -1)
    metrics = {
        "examples": kept.sum().astype(jnp.float32),
        "target_entropy": jnp.where(kept, entropy, 0.0).sum() / count,
        "top1_agreement": jnp.where(kept, agree, False).sum() / count,
    }
    return RetrieverLoss(_reduce(per_example, kept, reduce), per_example,
                         jnp.where(valid, retriever_lp, -jnp.inf), target, metrics)


def marginal_loss(retriever_scores: Array, reader_log_likelihoods: Array,
                  valid: Array | None = None, *, retriever_temperature: float | Array = 1.0,
                  reduce: str = "mean", stop_reader_gradient: bool = False) -> RetrieverLoss:
    """The marginal likelihood, what REALM and RAG-Sequence train with:

        per_example = -logsumexp_k(log p_retr(z_k|x) + log p_reader(y|x, z_k)).

    Gradients reach both sides (the reader's unless ``stop_reader_gradient``). This is
    :func:`realm_loss` with one target per question, and :func:`rag_sequence_nll` (without
    label smoothing) on summed target log-probabilities; ORQA's retrieval term is the case
    p_reader = 1 for a candidate holding an answer, else 0 (:func:`marginal_nll`).
    ``target_probs`` is the posterior p(z_k|x, y): the gradient with respect to the scores is
    (p_retr - posterior) / retriever_temperature.
    """
    scores, reader, valid, kept, softmax_set = _inputs(
        retriever_scores, reader_log_likelihoods, valid, "reader_log_likelihoods",
        retriever_temperature=retriever_temperature)
    if stop_reader_gradient:
        reader = jax.lax.stop_gradient(reader)
    out = realm_loss(scores / retriever_temperature, reader[:, :, None], kept[:, None],
                     softmax_set)
    posterior = _masked_log_softmax(out.retrieval_log_probs + reader, softmax_set)
    return _finish(-out.marginal_log_probs[:, 0], kept, valid, out.retrieval_log_probs,
                   posterior, reduce)


def emdr2_loss(retriever_scores: Array, reader_log_likelihoods: Array,
               valid: Array | None = None, *, retriever_temperature: float | Array = 1.0,
               reduce: str = "mean") -> RetrieverLoss:
    """EMDR² (Sachan et al., 2021), the retriever's term: :func:`marginal_loss` with the
    reader's per-document likelihoods a fixed target (``stop_gradient``), so the retriever is
    pulled towards the posterior p(z_k|x, y) and nothing reaches the reader. The paper's
    reader term (given all K documents) is the task's own loss. Atlas' code marginalizes per
    target token instead: :func:`realm_loss` over stop-gradient token log-probabilities.
    """
    return marginal_loss(retriever_scores, reader_log_likelihoods, valid,
                         retriever_temperature=retriever_temperature, reduce=reduce,
                         stop_reader_gradient=True)


def _distill(retriever_scores: Array, target_logits: Array, valid: Array | None,
             temperature: float | Array, retriever_temperature: float | Array, reduce: str,
             name: str) -> RetrieverLoss:
    """KL(softmax_k(stop_gradient(target_logits) / temperature) || p_retr), summed over the
    valid documents."""
    retriever_scores, target_logits, valid, kept, softmax_set = _inputs(
        retriever_scores, target_logits, valid, name, temperature=temperature,
        retriever_temperature=retriever_temperature)
    target_lp = _masked_log_softmax(jax.lax.stop_gradient(target_logits) / temperature,
                                    softmax_set)
    retriever_lp = _masked_log_softmax(retriever_scores / retriever_temperature, softmax_set)
    # zeroed outside the set first: exp(-inf) * (-inf + inf) would make nan gradients
    target_lp_safe = jnp.where(softmax_set, target_lp, 0.0)
    retriever_lp_safe = jnp.where(softmax_set, retriever_lp, 0.0)
    kl = jnp.sum(jnp.exp(target_lp_safe) * (target_lp_safe - retriever_lp_safe)
                 * softmax_set, axis=-1)
    return _finish(kl, kept, valid, retriever_lp, target_lp, reduce)


def pdist_loss(retriever_scores: Array, reader_log_likelihoods: Array,
               valid: Array | None = None, *, temperature: float | Array = 1.0,
               retriever_temperature: float | Array = 1.0, reduce: str = "mean"
               ) -> RetrieverLoss:
    """Perplexity distillation (Izacard et al., 2022, Atlas):

        target      = softmax_k(stop_gradient(log p_reader(y|x, z_k)) / temperature)
        per_example = KL(target || p_retr)

    the reader's posterior over documents with a uniform prior: one-hot on the reader's best
    document as temperature goes to 0, uniform over the valid documents as it grows. The KL
    is summed over documents (Atlas' code averages it over the B * K entries, a factor 1 / K,
    and divides the scores by sqrt(P) and a temperature: pass ``retriever_temperature``).
    """
    return _distill(retriever_scores, reader_log_likelihoods, valid, temperature,
                    retriever_temperature, reduce, "reader_log_likelihoods")


def loop_loss(retriever_scores: Array, loo_log_likelihoods: Array,
              valid: Array | None = None, *, temperature: float | Array = 1.0,
              retriever_temperature: float | Array = 1.0, reduce: str = "mean"
              ) -> RetrieverLoss:
    """Leave-one-out perplexity distillation (Izacard et al., 2022, Atlas): :func:`pdist_loss`
    with target softmax_k(-log p_reader(y|x, Z \\ {z_k}) / temperature), so the document
    whose removal hurts the reader most gets the most mass. Atlas runs the reader once per
    left-out document; for a reader that marginalizes over documents (RAG-Sequence),
    :func:`leave_one_out_marginals` computes them from the per-document likelihoods.
    """
    return _distill(retriever_scores, -jnp.asarray(loo_log_likelihoods, jnp.float32), valid,
                    temperature, retriever_temperature, reduce, "loo_log_likelihoods")


def leave_one_out_marginals(retriever_scores: Array, reader_log_likelihoods: Array,
                            valid: Array | None = None, *,
                            retriever_temperature: float | Array = 1.0) -> Array:
    """LOOP's leave-one-out log-likelihoods [B, K] for a reader whose likelihood given a set
    of documents is the retriever-weighted marginal (RAG-Sequence, REALM, EMDR²):

        out[b, k] = logsumexp_{j != k}(s_j + ll_j) - logsumexp_{j != k}(s_j),

    s = retriever_scores / retriever_temperature over the valid documents, ll the reader's
    per-document log-likelihoods. Entries with nothing left (an invalid document, or the
    only valid one) are 0: LOOP gives them no mass or all of it whatever their value.
    Gradients flow as through the inputs (:func:`loop_loss` stops them).
    """
    scores, reader, valid, _, _ = _inputs(
        retriever_scores, reader_log_likelihoods, valid, "reader_log_likelihoods",
        retriever_temperature=retriever_temperature)
    k = scores.shape[1]
    others = valid[:, None, :] & ~jnp.eye(k, dtype=bool)[None]             # [B, k, j]
    has_other = others.any(-1)
    others = jnp.where(has_other[..., None], others, True)                   # finite rows
    s = scores / retriever_temperature
    lse = lambda x: jax.nn.logsumexp(jnp.where(others, x[:, None, :], -jnp.inf), -1)  # noqa
    return jnp.where(has_other & valid, lse(s + reader) - lse(s), 0.0)
