"""The ORQA / REALM open-QA fine-tuning objective and span extraction.

For a question x, a retriever beam z_1..z_R (R up to 5000) scored by the live query tower
against the frozen document index, and the top k (5) of them read by the span reader:

    retrieval loss  -log sum_{z correct} softmax_R(S(x, z))
    reader loss     -log sum_{(z, s) correct} softmax_{k*S}(S(x, z) + reader(x, z, s))
    loss            retrieval + reader

A candidate z is correct when its text contains an answer; a pair (z, s) when the span s's
text matches an answer. Each term is dropped (0) for a question with no correct candidate
(pair) and counted. Following the reference implementation (google-research/language,
``orqa/models/orqa_model.py``: ``read`` adds the retriever logits to the span logits,
``compute_loss`` takes ``marginal_log_loss`` of both, each times ``any(correct)``), the
reader's softmax is joint over every span of every read block and the block's retrieval
score is part of each span's logit, so the reader loss trains the query tower too. The
prediction is the argmax of the same joint logits (``get_predictions``).

The batch loss is the sum over questions divided by B (a dropped question adds 0, as the
reference's per-question losses averaged over questions).

Spans are the reader's (start, end) candidates in :func:`realm_jax.models.heads.span_candidates`
order (by width, then start); a valid span covers evidence (:func:`evidence_mask`) only.

Host (numpy) and device (jax) both work for :func:`span_valid_mask`, :func:`best_span`,
:func:`evidence_mask` and :func:`span_index`; the losses are jax.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.objectives.realm import array_module

Array = jax.Array


class OrqaLoss(NamedTuple):
    """What :func:`orqa_loss` returns (a pytree, fine as a jit output)."""

    loss: Array               # [] retrieval_loss + reader_loss
    retrieval_loss: Array     # [] sum of the per-question retrieval losses / B
    reader_loss: Array        # [] sum of the per-question reader losses / B
    retrieval_dropped: Array  # [] questions with no correct candidate in the beam
    reader_dropped: Array     # [] questions with no correct (candidate, span) among the read
    retrieval_nll: Array      # [B] per question (0 where dropped)
    reader_nll: Array         # [B] per question (0 where dropped)


def marginal_nll(logits: Array, correct: Array, valid: Array | None = None
                 ) -> tuple[Array, Array]:
    """-log of the softmax mass on the correct entries, per row: logits [B, ...] (all axes
    after the first are one softmax), correct and valid bool of the same shape (invalid
    entries get no mass). Returns (nll [B], kept [B]): rows with no valid correct entry are
    kept=False with nll exactly 0 and zero gradients (never inf - inf)."""
    logits = jnp.asarray(logits, jnp.float32)
    b = logits.shape[0]
    logits = logits.reshape(b, -1)
    valid = (jnp.ones(logits.shape, bool) if valid is None
             else jnp.asarray(valid, bool).reshape(b, -1))
    correct = jnp.asarray(correct, bool).reshape(b, -1) & valid
    kept = correct.any(-1)
    # A dropped row's numerator runs over the same entries as its denominator (0 exactly);
    # a row with nothing valid uses every entry (finite), and is dropped anyway.
    denominator_set = jnp.where(valid.any(-1, keepdims=True), valid, True)
    numerator_set = jnp.where(kept[:, None], correct, denominator_set)
    lse = lambda m: jax.nn.logsumexp(jnp.where(m, logits, -jnp.inf), axis=-1)  # noqa: E731
    return jnp.where(kept, lse(denominator_set) - lse(numerator_set), 0.0), kept


def joint_span_logits(span_logits: Array, retrieval_logits: Array) -> Array:
    """The reader's logits over (candidate, span) pairs: span logits [B, k, S] plus each
    candidate's retrieval logit [B, k] (as ORQA's ``read``)."""
    return (jnp.asarray(span_logits, jnp.float32)
            + jnp.asarray(retrieval_logits, jnp.float32)[..., None])


def orqa_loss(retrieval_logits: Array, retrieval_correct: Array, span_logits: Array,
              span_correct: Array, *, beam_valid: Array | None = None,
              span_valid: Array | None = None) -> OrqaLoss:
    """The ORQA loss.

    Args:
      retrieval_logits: [B, R] scores of the beam, best first (the live query tower's).
      retrieval_correct: [B, R] bool, the candidate's text contains an answer.
      span_logits: [B, k, S] the reader's logits of the first k candidates' spans
        (k <= R; out-of-evidence spans may carry the reader's large negative mask).
      span_correct: [B, k, S] bool, the span's text matches an answer.
      beam_valid: [B, R] optional, False for empty beam slots.
      span_valid: [B, k, S] optional, False for spans outside the evidence
        (:func:`span_valid_mask`); empty read slots are taken from beam_valid.
    """
    retrieval_logits = jnp.asarray(retrieval_logits, jnp.float32)
    b, r = retrieval_logits.shape
    if span_logits.ndim != 3 or span_logits.shape[0] != b or span_logits.shape[1] > r:
        raise ValueError(f"need retrieval_logits [B, R] and span_logits [B, k<=R, S], got "
                         f"{retrieval_logits.shape} and {span_logits.shape}")
    k = span_logits.shape[1]
    if beam_valid is None:
        beam_valid = jnp.ones((b, r), bool)
    beam_valid = jnp.asarray(beam_valid, bool)
    pair_valid = jnp.broadcast_to(beam_valid[:, :k, None], span_logits.shape)
    if span_valid is not None:
        pair_valid = pair_valid & jnp.asarray(span_valid, bool)
    retrieval_nll, retrieval_kept = marginal_nll(retrieval_logits, retrieval_correct, beam_valid)
    joint = joint_span_logits(span_logits, retrieval_logits[:, :k])
    reader_nll, reader_kept = marginal_nll(joint, span_correct, pair_valid)
    retrieval_loss, reader_loss = retrieval_nll.sum() / b, reader_nll.sum() / b
    return OrqaLoss(retrieval_loss + reader_loss, retrieval_loss, reader_loss,
                    (~retrieval_kept).sum(), (~reader_kept).sum(), retrieval_nll, reader_nll)


# ---------------------------------------------------------------------------------------
# Spans

def evidence_mask(token_type_ids: Any) -> Any:
    """The passage tokens of ``[CLS] question [SEP] passage [SEP]`` rows [..., T]: the
    second segment without its closing [SEP] (the last token of the segment)."""
    xp = array_module(token_type_ids)
    second = xp.asarray(token_type_ids) == 1
    following = xp.concatenate([second[..., 1:], xp.zeros_like(second[..., :1])], axis=-1)
    return second & following


def span_valid_mask(evidence: Any, starts: Any, ends: Any, max_width: int | None = None) -> Any:
    """[..., S] bool: span (starts[s], ends[s]) covers evidence tokens only (evidence
    [..., T]) and, with ``max_width``, is at most that many tokens wide."""
    xp = array_module(evidence, starts, ends)
    evidence = xp.asarray(evidence).astype(xp.int32)
    starts, ends = xp.asarray(starts), xp.asarray(ends)
    counts = xp.concatenate([xp.zeros_like(evidence[..., :1]), xp.cumsum(evidence, axis=-1)],
                            axis=-1)                                   # [..., T + 1]
    covered = xp.take(counts, ends + 1, axis=-1) - xp.take(counts, starts, axis=-1)
    width = ends - starts + 1
    ok = (covered == width) & (width >= 1)
    if max_width is not None:
        ok = ok & (width <= max_width)
    return ok


class BestSpan(NamedTuple):
    candidate: Any  # [B] index of the read candidate
    start: Any      # [B] first token (reader position)
    end: Any        # [B] last token (inclusive)
    score: Any      # [B] its joint logit (-inf when no span is valid)


def best_span(joint_logits: Any, starts: Any, ends: Any, valid: Any) -> BestSpan:
    """The argmax over valid (candidate, span) pairs: joint logits and valid [B, k, S]
    (:func:`joint_span_logits`, :func:`span_valid_mask`), spans (starts, ends) [S]."""
    xp = array_module(joint_logits, valid)
    logits = xp.where(xp.asarray(valid, bool), xp.asarray(joint_logits, xp.float32), -xp.inf)
    b, _, s = logits.shape
    flat = logits.reshape(b, -1)
    best = xp.argmax(flat, axis=-1)
    score = xp.take_along_axis(flat, best[:, None], axis=-1)[:, 0]
    span = best % s
    return BestSpan(best // s, xp.asarray(starts)[span], xp.asarray(ends)[span], score)


def span_index(start: Any, end: Any, length: int, max_width: int) -> Any:
    """Index of span (start, end) in ``span_candidates(length, max_width)`` (width-major:
    the (T - w + 1) spans of width w follow those of the narrower widths)."""
    xp = array_module(start, end)
    start, end = xp.asarray(start), xp.asarray(end)
    w = end - start + 1
    if xp is np and np.any((w < 1) | (w > max_width) | (start < 0) | (end >= length)):
        raise ValueError(f"span_index: spans outside widths 1..{max_width} or length {length}")
    return (w - 1) * (length + 1) - (w - 1) * w // 2 + start


def span_labels(token_spans: Sequence[tuple[int, int]], offset: int, num_evidence: int,
                length: int, max_width: int) -> np.ndarray:
    """[S] bool over the reader's spans: the passage-token spans (i, j) (inclusive) that
    fit the reader's evidence (the first ``num_evidence`` passage tokens, placed from
    position ``offset`` on) and the width."""
    out = np.zeros(num_spans(length, max_width), bool)
    spans = np.asarray(list(token_spans), np.int64).reshape(-1, 2)
    keep = (spans[:, 0] >= 0) & (spans[:, 1] < num_evidence) & (spans[:, 1] >= spans[:, 0]) \
        & (spans[:, 1] - spans[:, 0] < max_width)
    spans = spans[keep] + offset
    out[span_index(spans[:, 0], spans[:, 1], length, max_width)] = True
    return out


def num_spans(length: int, max_width: int) -> int:
    """S, the number of spans of width <= max_width in ``length`` tokens."""
    w = min(max_width, length)
    return w * (length + 1) - w * (w + 1) // 2
