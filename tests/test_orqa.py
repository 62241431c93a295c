"""ORQA / REALM open-QA fine-tuning: the losses hand-computed (dropped rows, masked spans),
best-span extraction (never outside the passage, never wider than the limit), answer-span
marking with the evaluation's normalization, the loss and gradients sharded on 8 emulated
devices equal to one device's, and a tiny fine-tuning run on Wikipedia sample text (MiniLM
weights) through the trainer, the frozen index built by the refresher from the same
weights, that raises exact match above the untrained reader's."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import config as config_lib
from realm_jax import sharding
from realm_jax.data.answers import PassageTokens, matching_spans
from realm_jax.data.realm_examples import SpecialIds
from realm_jax.models.heads import SPAN_MASK_SCORE, span_candidates
from realm_jax.objectives import orqa
from realm_jax.objectives.realm import reader_inputs

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn, *args, **static):
    """fn jitted and compiled cheaply for these arguments (one small program, not dozens of
    op-by-op ones)."""
    f = jax.jit(lambda *a: fn(*a, **static))
    return f.lower(*args).compile(FAST)(*args)


def _lse(x):
    x = np.asarray(x, np.float64)
    return np.log(np.exp(x - x.max()).sum()) + x.max()


# ---------------------------------------------------------------------------------------
# Losses


def test_retrieval_loss_hand_computed_with_dropped_and_masked_entries():
    logits = np.array([[2.0, 1.0, 0.0, -1.0],
                       [0.5, 0.5, 3.0, 9.0],      # entry 3 invalid: no mass
                       [1.0, 2.0, 3.0, 4.0]], np.float32)
    correct = np.array([[False, True, True, False],
                        [True, False, False, True],  # the invalid entry's "correct" is ignored
                        [False, False, False, False]])  # dropped
    valid = np.array([[True] * 4, [True, True, True, False], [True] * 4])
    nll, kept = _jit(orqa.marginal_nll, logits, correct, valid)
    want0 = _lse([2, 1, 0, -1]) - _lse([1, 0])
    want1 = _lse([0.5, 0.5, 3.0]) - 0.5
    np.testing.assert_allclose(nll, [want0, want1, 0.0], rtol=1e-6)
    assert kept.tolist() == [True, True, False]
    # A row with nothing valid is dropped, finite.
    nll, kept = _jit(orqa.marginal_nll, np.zeros((1, 3)), np.ones((1, 3), bool),
                     np.zeros((1, 3), bool))
    assert nll.tolist() == [0.0] and kept.tolist() == [False]


def test_orqa_loss_hand_computed_reader_joint_over_candidates_and_spans():
    # B=2 questions, beam R=3, k=2 read, S=3 spans.
    retr = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]], np.float32)
    retr_correct = np.array([[False, True, True], [False, False, False]])   # row 1 dropped
    span = np.array([[[0.5, 1.5, SPAN_MASK_SCORE], [2.0, -1.0, 0.0]],
                     [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]], np.float32)
    span_valid = np.array([[[True, True, False], [True, True, True]],
                           [[True, True, True], [True, True, True]]])
    span_correct = np.array([[[False, False, True], [True, False, True]],    # [0,0,2] masked
                             [[False, True, False], [False, False, False]]])
    out = _jit(orqa.orqa_loss, retr, retr_correct, span, span_correct, span_valid=span_valid)
    r0 = _lse([1, 0, -1]) - _lse([0, -1])
    # reader, row 0: joint logits span + retrieval logit of the candidate, over valid pairs
    joint0 = [0.5 + 1, 1.5 + 1, 2.0 + 0, -1.0 + 0, 0.0 + 0]
    d0 = _lse(joint0) - _lse([2.0 + 0, 0.0 + 0])
    joint1 = [0 + 0, 1 + 0, 2 + 0, 3 + 2, 0 + 2, 0 + 2]
    d1 = _lse(joint1) - (1.0 + 0)
    np.testing.assert_allclose(out.retrieval_nll, [r0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out.reader_nll, [d0, d1], rtol=1e-6)
    np.testing.assert_allclose(out.retrieval_loss, r0 / 2, rtol=1e-6)
    np.testing.assert_allclose(out.reader_loss, (d0 + d1) / 2, rtol=1e-6)
    np.testing.assert_allclose(out.loss, (r0 + d0 + d1) / 2, rtol=1e-6)
    assert int(out.retrieval_dropped) == 1 and int(out.reader_dropped) == 0
    # Empty beam slots take no mass and are never read.
    beam_valid = np.array([[True, True, False], [True, False, False]])
    out = _jit(orqa.orqa_loss, retr, retr_correct, span, span_correct, beam_valid=beam_valid,
               span_valid=span_valid)
    np.testing.assert_allclose(out.retrieval_nll[0], _lse([1, 0]) - 0.0, rtol=1e-6)
    np.testing.assert_allclose(out.reader_nll[1], _lse([0, 1, 2]) - 1.0, rtol=1e-6)


def test_loss_gradients_finite_and_dropped_rows_give_none():
    rng = np.random.default_rng(0)
    retr = rng.normal(size=(3, 6)).astype(np.float32)
    span = rng.normal(size=(3, 2, 5)).astype(np.float32)
    retr_correct = np.zeros((3, 6), bool)
    retr_correct[0, 2] = True
    span_correct = np.zeros((3, 2, 5), bool)
    span_correct[1, 1, 3] = True
    beam_valid = np.ones((3, 6), bool)
    beam_valid[2] = False                                  # a row with nothing at all

    def f(retr, span):
        return orqa.orqa_loss(retr, retr_correct, span, span_correct, beam_valid=beam_valid).loss

    g_retr, g_span = _jit(jax.grad(f, argnums=(0, 1)), retr, span)
    assert np.isfinite(g_retr).all() and np.isfinite(g_span).all()
    assert not np.any(g_retr[2]) and not np.any(g_span[2])   # nothing to learn from row 2
    assert not np.any(g_span[0])                              # row 0's reader term dropped
    assert np.any(g_retr[1])        # row 1's reader term reaches its retrieval logits


# ---------------------------------------------------------------------------------------
# Spans


def test_span_index_matches_span_candidates_and_labels():
    for length, width in ((7, 3), (5, 10), (12, 10)):
        starts, ends = span_candidates(length, width)
        assert len(starts) == orqa.num_spans(length, width)
        np.testing.assert_array_equal(orqa.span_index(starts, ends, length, width),
                                      np.arange(len(starts)))
    labels = orqa.span_labels([(0, 1), (2, 2), (3, 9), (4, 5)], offset=3, num_evidence=5,
                              length=12, max_width=4)
    starts, ends = span_candidates(12, 4)
    marked = {(int(s), int(e)) for s, e in zip(starts[labels], ends[labels])}
    assert marked == {(3, 4), (5, 5)}     # (3, 9): too wide; (4, 5): past the evidence
    with pytest.raises(ValueError):
        orqa.span_index(np.array([2]), np.array([1]), 12, 4)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_best_span_stays_in_the_passage_and_within_the_width(xp):
    """Questions of different lengths, passages of different lengths (one empty read slot):
    the best span, whatever the logits, lies inside the passage's tokens and is at most
    max_width wide, even when the question and the padding carry the highest logits."""
    sep = 2
    q_ids = np.array([[1, 7, 8, 2, 0, 0], [1, 9, 9, 9, 9, 2]], np.int32)
    q_mask = (q_ids != 0).astype(np.int32)
    lengths = np.array([[4, 9], [6, 0]], np.int32)
    cands = np.full((2, 2, 9), 5, np.int32)
    r = reader_inputs(q_ids, q_mask, cands, lengths, sep_id=sep, length=14)
    starts, ends = span_candidates(14, 3)

    def masks(types, starts, ends):
        evidence = orqa.evidence_mask(types)
        return evidence, orqa.span_valid_mask(evidence, starts, ends, max_width=3)

    if xp is np:
        evidence, valid = masks(r.token_type_ids, starts, ends)
        best_span = orqa.best_span
    else:
        evidence, valid = _jit(masks, *map(jnp.asarray, (r.token_type_ids, starts, ends)))
        best_span = jax.jit(orqa.best_span).lower(
            jnp.zeros(valid.shape), starts, ends, valid).compile(FAST)
    np.testing.assert_array_equal(np.asarray(evidence).sum(-1), [[4, 9], [6, 0]])
    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = rng.normal(size=(2, 2, len(starts))).astype(np.float32)
        outside = ~np.asarray(valid)
        logits[outside] += 100.0                  # tempting spans outside the passage
        best = best_span(xp.asarray(logits), starts, ends, valid)
        for b in range(2):
            c, s, e = int(best.candidate[b]), int(best.start[b]), int(best.end[b])
            assert np.asarray(evidence)[b, c, s:e + 1].all(), (trial, b, c, s, e)
            assert e - s + 1 <= 3
            assert float(best.score[b]) == pytest.approx(
                np.where(np.asarray(valid), logits, -np.inf)[b].max())
    # No valid span at all: score -inf.
    none = orqa.best_span(np.zeros((1, 1, 4)), starts[:4], ends[:4], np.zeros((1, 1, 4), bool))
    assert float(none.score[0]) == -np.inf


def test_span_valid_mask_needs_every_token_inside():
    evidence = np.array([[0, 1, 1, 0, 1, 1, 1, 0]], bool)   # a gap at 3
    starts, ends = span_candidates(8, 4)
    valid = orqa.span_valid_mask(evidence, starts, ends)
    got = {(int(s), int(e)) for s, e, v in zip(starts, ends, valid[0]) if v}
    want = {(s, e) for s in range(8) for e in range(s, min(8, s + 4))
            if evidence[0, s:e + 1].all()}
    assert got == want and (1, 4) not in got


# ---------------------------------------------------------------------------------------
# Answer spans


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from realm_jax.data.blocks import load_tokenizer
    return load_tokenizer(minilm_path)


def test_answer_spans_use_the_evaluation_normalization(tokenizer):
    from realm_jax.evaluate import exact_match, normalize_answer

    text = ("The Beatles were an English rock band formed in Liverpool in 1960. The U.S. "
            "release of (the) Beatles' album; New-York Times. Ghana's capital is Accra.")
    p = PassageTokens.from_text(text, tokenizer)

    def found(answers, width=10, regex=False):
        return [p.span_text(i, j) for i, j in matching_spans(p, answers, width, regex=regex)]

    assert found(["the Beatles"]) == ["Beatles", "Beatles"]    # content at both ends
    assert found(["US"]) == ["U.S"]
    assert found(["Liverpool in 1960"]) == ["Liverpool in 1960"]
    assert found(["Liverpool in 1960"], width=2) == []          # wider than allowed
    assert found(["newyork"]) == ["New-York"] and found(["New York"]) == []
    assert found(["Accra", "Ghana"]) == ["Ghana", "Accra"]
    assert found(["ccra"]) == []                                 # never half a word
    assert found([r"\d{4}"], regex=True)[0] == "1960"
    # Exhaustive check: every span (content at both ends) whose text exact-matches is found.
    n = len(p)
    for answers in (["Beatles"], ["U.S."], ["english rock band"], ["1960."]):
        spans = set(matching_spans(p, answers, 10))
        want = {(i, j) for i in range(n) for j in range(i, min(n, i + 10))
                if p.normalized[i] != "" and p.normalized[j] != ""
                and exact_match(p.span_text(i, j), answers)}
        assert spans == want, answers
        assert all(normalize_answer(p.span_text(i, j)) in {normalize_answer(a) for a in answers}
                   for i, j in spans)
