"""RAG-Sequence and RAG-Token losses: hand-computed values, and parity (loss and gradient with
respect to the document scores) with Hugging Face's PyTorch RagSequenceForGeneration and
RagTokenForGeneration on a tiny DPR + BART model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.objectives import (
    doc_log_probs, marginalize_token_logprobs, rag_sequence_nll, rag_token_nll, shift_targets,
    split_docs)

LOSSES = {"sequence": rag_sequence_nll, "token": rag_token_nll}


# ----------------------------------------------------------------------------------------
# A 2-document, 3-step, 4-word example whose probabilities are powers of two.

P_Z = np.array([0.75, 0.25])
PROBS = np.array([                       # p(v | z, t): [K=2, T=3, V=4]
    [[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], [0.125, 0.125, 0.25, 0.5]],
    [[0.25, 0.5, 0.125, 0.125], [0.5, 0.125, 0.25, 0.125], [0.25, 0.25, 0.25, 0.25]],
])
PAD = 2
LN2 = np.log(2.0)


def _hand(targets):
    """The example as ([1, K, T, V] logits, [1, T] targets, [1, K] scores); log-probabilities
    shifted by arbitrary per-row constants, which the softmaxes must cancel."""
    logits = np.log(PROBS) + np.array([[1.0], [-3.0]])[:, :, None]
    scores = np.log(P_Z) + 5.0
    return (jnp.asarray(logits[None], jnp.float32), jnp.asarray([targets]),
            jnp.asarray(scores[None], jnp.float32))


@pytest.mark.parametrize("targets, seq_p, tok_p", [
    # targets 0, 1, 3: doc 0 gives 1/2 * 1/4 * 1/2 = 1/16, doc 1 gives 1/4 * 1/8 * 1/4 = 1/128
    ([0, 1, 3], 0.75 / 16 + 0.25 / 128, 0.4375 * 0.21875 * 0.4375),
    # the last position padded
    ([0, 1, PAD], 0.75 / 8 + 0.25 / 32, 0.4375 * 0.21875),
    # one real target: the document prior still counts once (Hugging Face drops it here)
    ([3, PAD, PAD], 0.75 * 0.125 + 0.25 * 0.125, 0.125),
])
def test_hand_computed(targets, seq_p, tok_p):
    logits, t, s = _hand(targets)
    seq, tok = (fn(logits, t, s, pad_id=PAD) for fn in (rag_sequence_nll, rag_token_nll))
    np.testing.assert_allclose(seq, -np.log(seq_p), rtol=1e-6)
    np.testing.assert_allclose(tok, -np.log(tok_p), rtol=1e-6)


def test_hand_computed_exclude_bos():
    logits, t, s = _hand([0, 1, 3])
    seq = rag_sequence_nll(logits, t, s, pad_id=PAD, exclude_bos_score=True)
    np.testing.assert_allclose(seq, -np.log(0.75 / 4 * 0.5 + 0.25 / 8 * 0.25), rtol=1e-6)
    tok = rag_token_nll(logits, t, s, pad_id=PAD, exclude_bos_score=True)
    np.testing.assert_allclose(tok, -np.log(0.21875 * 0.4375), rtol=1e-6)
    # with bos_id, only when every row's first target is bos (Hugging Face's check)
    for bos, dropped in ((0, True), (1, False)):
        got = rag_sequence_nll(logits, t, s, pad_id=PAD, exclude_bos_score=True, bos_id=bos)
        want = seq if dropped else rag_sequence_nll(logits, t, s, pad_id=PAD)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_hand_computed_label_smoothing():
    eps, v = 0.1, 4
    logits, t, s = _hand([0, 1, 3])
    # RAG-Sequence: per document, sum over t and v of log p(v|z,t), plus V log p(z);
    # both documents have sum_t sum_v log2 p = -26.
    smooth = 26 * LN2 - np.log(np.sum(P_Z ** v))
    nll = -np.log(0.75 / 16 + 0.25 / 128)
    for exclude_bos in (False, True):     # the smoothing term keeps position 0 either way
        n = -np.log(0.75 / 4 * 0.5 + 0.25 / 8 * 0.25) if exclude_bos else nll
        got = rag_sequence_nll(logits, t, s, pad_id=PAD, epsilon=eps, exclude_bos_score=exclude_bos)
        np.testing.assert_allclose(got, (1 - eps) * n + eps / v * smooth, rtol=1e-6)
    # RAG-Token: the marginal distributions p(v|t) = sum_z p(z) p(v|z,t)
    marginal = np.array([[0.4375, 0.3125, 0.125, 0.125], [0.3125, 0.21875, 0.25, 0.21875],
                         [0.15625, 0.15625, 0.25, 0.4375]])
    np.testing.assert_allclose(marginalize_token_logprobs(logits, s)[0], np.log(marginal),
                               rtol=1e-6)
    smooth = -np.log(marginal).sum()
    got = rag_token_nll(logits, t, s, pad_id=PAD, epsilon=eps)
    nll = -np.log(0.4375 * 0.21875 * 0.4375)
    np.testing.assert_allclose(got, (1 - eps) * nll + eps / v * smooth, rtol=1e-6)


def test_single_document_losses_agree():
    """With one document both losses are the plain sequence nll."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 1, 6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 6)))
    scores = jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)
    for eps in (0.0, 0.2):
        np.testing.assert_allclose(rag_sequence_nll(logits, targets, scores, pad_id=0, epsilon=eps),
                                   rag_token_nll(logits, targets, scores, pad_id=0, epsilon=eps),
                                   rtol=1e-5)


def test_helpers_and_jit():
    ids = jnp.array([[2, 0, 7, 8, 2], [2, 0, 9, 2, 1]])
    np.testing.assert_array_equal(shift_targets(ids, 1), [[0, 7, 8, 2, 1], [0, 9, 2, 1, 1]])
    flat = jnp.arange(6 * 2).reshape(6, 2)
    np.testing.assert_array_equal(split_docs(flat, 3)[1, 0], flat[3])
    with pytest.raises(ValueError):
        split_docs(flat, 4)
    np.testing.assert_allclose(jnp.exp(doc_log_probs(jnp.log(jnp.array([[3.0, 1.0]])))),
                               [[0.75, 0.25]])
    # one decoding step: [B, K, V] -> [B, V]
    logits, _, s = _hand([0, 1, 3])
    np.testing.assert_allclose(marginalize_token_logprobs(logits[:, :, 0], s),
                               marginalize_token_logprobs(logits, s)[:, 0], rtol=1e-6)
    # jit-able with traced epsilon, bfloat16 logits accepted (computed in float32)
    t = jnp.array([[0, 1, 3]])
    for fn in LOSSES.values():
        f = jax.jit(functools.partial(fn, pad_id=PAD, exclude_bos_score=True, bos_id=0))
        got = f(logits.astype(jnp.bfloat16), t, s, epsilon=jnp.float32(0.1))
        want = fn(logits.astype(jnp.bfloat16).astype(jnp.float32), t, s, pad_id=PAD, epsilon=0.1,
                  exclude_bos_score=True)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # an ignore label outside the vocabulary works as pad_id, value and gradient
    t_ignore = jnp.array([[0, 1, -100]])
    for fn in LOSSES.values():
        np.testing.assert_allclose(
            fn(logits, t_ignore, s, pad_id=-100, epsilon=0.1),
            fn(logits, jnp.array([[0, 1, PAD]]), s, pad_id=PAD, epsilon=0.1), rtol=1e-6)
        g = jax.grad(lambda x, fn=fn: fn(x, t_ignore, s, pad_id=-100))(logits)
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, :, 2] == 0)
    with pytest.raises(ValueError, match="targets"):
        rag_token_nll(logits, jnp.zeros((1, 4), jnp.int32), s, pad_id=PAD)


# ----------------------------------------------------------------------------------------
# Parity with transformers' PyTorch RAG.

B, K, T, V = 3, 3, 8, 50
G_PAD, G_BOS, G_EOS = 1, 0, 2
TOL = 1e-4


@pytest.fixture(scope="module")
def torch_rag():
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    q = tr.DPRConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    # a wide init, so that the documents give clearly different next-token distributions
    g = tr.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                      decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=G_PAD,
                      bos_token_id=G_BOS, eos_token_id=G_EOS, decoder_start_token_id=G_EOS,
                      init_std=0.5)
    config = tr.RagConfig.from_question_encoder_generator_configs(q, g, n_docs=K)
    torch.manual_seed(0)
    question_encoder, generator = tr.DPRQuestionEncoder(q), tr.BartForConditionalGeneration(g)
    models = {
        "sequence": tr.RagSequenceForGeneration(config=config, question_encoder=question_encoder,
                                                generator=generator).eval(),
        "token": tr.RagTokenForGeneration(config=config, question_encoder=question_encoder,
                                          generator=generator).eval(),
    }
    return torch, models


def _rag_batch(seed, all_bos=True):
    """Contexts [B * K, L] (right-padded), labels [B, T] = decoder inputs
    (start, bos, words, eos, pads), document scores [B, K]."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(3, V, (B * K, 10))
    ctx_mask = np.ones_like(ctx)
    for row, length in ((1, 6), (4, 8), (8, 3)):
        ctx[row, length:], ctx_mask[row, length:] = G_PAD, 0
    labels = rng.integers(3, V, (B, T))
    labels[:, 0], labels[:, 1] = G_EOS, G_BOS
    for row, length in ((0, T), (1, 5), (2, 4)):   # at least 2 scored targets per row
        labels[row, length - 1] = G_EOS
        labels[row, length:] = G_PAD
    if not all_bos:
        labels[2, 1] = 7
    scores = 2.0 * rng.normal(size=(B, K))
    return ctx, ctx_mask, labels, scores


def _torch_loss(torch, model, batch, kind, eps, exclude_bos, reduce):
    ctx, ctx_mask, labels, scores = batch
    model.config.label_smoothing = eps
    doc_scores = torch.tensor(scores, dtype=torch.float32, requires_grad=True)
    kwargs = dict(exclude_bos_score=exclude_bos) if kind == "sequence" else {}
    out = model(context_input_ids=torch.from_numpy(ctx),
                context_attention_mask=torch.from_numpy(ctx_mask), doc_scores=doc_scores,
                labels=torch.from_numpy(labels), n_docs=K, reduce_loss=reduce, **kwargs)
    out.loss.sum().backward()
    return out.logits.detach().numpy(), out.loss.detach().numpy(), doc_scores.grad.numpy()


CASES = [("sequence", eps, ex) for eps in (0.0, 0.1) for ex in (False, True)]
CASES += [("token", eps, False) for eps in (0.0, 0.1)]


@functools.partial(jax.jit, static_argnames=("kind", "eps", "exclude_bos"))
def _loss_and_grad(logits, targets, scores, *, kind, eps, exclude_bos):
    """Per-question losses [B] and the gradient of their sum with respect to the scores."""
    fn = functools.partial(LOSSES[kind], pad_id=G_PAD, epsilon=eps, exclude_bos_score=exclude_bos,
                           reduce=False)
    def total(s):
        losses = fn(logits, targets, s)
        return jnp.sum(losses), losses

    (_, losses), grad = jax.value_and_grad(total, has_aux=True)(scores)
    return losses, grad


@pytest.mark.parametrize("kind, eps, exclude_bos", CASES)
def test_parity_with_transformers(torch_rag, kind, eps, exclude_bos):
    torch, models = torch_rag
    batch = _rag_batch(seed=len(kind) + int(10 * eps) + 2 * exclude_bos)
    model = models[kind]
    flat_logits, want_loss, want_grad = _torch_loss(torch, model, batch, kind, eps, exclude_bos,
                                                    False)
    _, want_sum, want_sum_grad = _torch_loss(torch, model, batch, kind, eps, exclude_bos, True)
    logits = split_docs(jnp.asarray(flat_logits), K)                     # [B, K, T, V]
    targets = shift_targets(jnp.asarray(batch[2]), G_PAD)
    scores = jnp.asarray(batch[3], jnp.float32)
    got, grad = _loss_and_grad(logits, targets, scores, kind=kind, eps=eps, exclude_bos=exclude_bos)
    assert got.shape == want_loss.shape == (B,)
    np.testing.assert_allclose(got, want_loss, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(grad, want_grad, atol=TOL, rtol=TOL)
    assert np.abs(want_grad).max() > 1e-2                     # the documents really differ
    # reduce=True is the batch sum, as transformers' reduce_loss
    np.testing.assert_allclose(np.sum(got), want_sum, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(want_sum_grad, want_grad, atol=1e-6)
    reduced = LOSSES[kind](logits, targets, scores, pad_id=G_PAD, epsilon=eps,
                           exclude_bos_score=exclude_bos, reduce=True)
    assert reduced.shape == ()
    np.testing.assert_allclose(reduced, want_sum, atol=TOL, rtol=TOL)


def test_parity_exclude_bos_not_all_rows(torch_rag):
    """Hugging Face drops the bos position only if every row's first target is bos; bos_id
    reproduces that, and without it the position is always dropped."""
    torch, models = torch_rag
    batch = _rag_batch(seed=5, all_bos=False)
    model = models["sequence"]
    flat_logits, want, _ = _torch_loss(torch, model, batch, "sequence", 0.0, True, False)
    _, want_kept, _ = _torch_loss(torch, model, batch, "sequence", 0.0, False, False)
    np.testing.assert_allclose(want, want_kept)
    args = (split_docs(jnp.asarray(flat_logits), K), shift_targets(jnp.asarray(batch[2]), G_PAD),
            jnp.asarray(batch[3], jnp.float32))
    got = rag_sequence_nll(*args, pad_id=G_PAD, exclude_bos_score=True, bos_id=G_BOS, reduce=False)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    dropped = rag_sequence_nll(*args, pad_id=G_PAD, exclude_bos_score=True, reduce=False)
    assert np.all(np.asarray(dropped) < np.asarray(got))


def test_marginal_matches_transformers(torch_rag):
    """RagTokenForGeneration's do_marginalize logits are our marginal next-token log-probs."""
    torch, models = torch_rag
    ctx, ctx_mask, labels, scores = _rag_batch(seed=7)
    with torch.no_grad():
        out = models["token"](context_input_ids=torch.from_numpy(ctx),
                              context_attention_mask=torch.from_numpy(ctx_mask),
                              doc_scores=torch.tensor(scores, dtype=torch.float32),
                              decoder_input_ids=torch.from_numpy(labels), n_docs=K,
                              do_marginalize=True)
        flat = models["token"](context_input_ids=torch.from_numpy(ctx),
                               context_attention_mask=torch.from_numpy(ctx_mask),
                               doc_scores=torch.tensor(scores, dtype=torch.float32),
                               decoder_input_ids=torch.from_numpy(labels), n_docs=K).logits
    got = marginalize_token_logprobs(split_docs(jnp.asarray(flat.numpy()), K), jnp.asarray(scores))
    np.testing.assert_allclose(got, out.logits.numpy(), atol=TOL, rtol=TOL)


def test_single_target_row_keeps_document_prior(torch_rag):
    """transformers adds log p(z|x) at target position 1 (so that the bos position can be
    dropped), and so loses it when position 1 is a pad: a row with a single scored target
    gets -logsumexp_z log p(y|z), as if p(z|x) were 1 for every document. We count the
    prior once whatever the padding: that row equals transformers' value under uniform scores
    plus log K; the other rows match as usual."""
    torch, models = torch_rag
    ctx, ctx_mask, labels, scores = _rag_batch(seed=9)
    labels[0, 2], labels[0, 3:] = G_EOS, G_PAD           # targets: bos, eos (two: no difference)
    labels[1, 1], labels[1, 2:] = 11, G_PAD              # targets: one word
    batch = (ctx, ctx_mask, labels, scores)
    model = models["sequence"]
    flat_logits, want, _ = _torch_loss(torch, model, batch, "sequence", 0.0, False, False)
    logits = split_docs(jnp.asarray(flat_logits), K)
    targets = shift_targets(jnp.asarray(labels), G_PAD)
    loss = functools.partial(rag_sequence_nll, logits, targets, pad_id=G_PAD, reduce=False)
    got = np.asarray(loss(jnp.asarray(scores, jnp.float32)))
    uniform = np.asarray(loss(jnp.zeros((B, K))))
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(uniform[1] - np.log(K), want[1], atol=TOL, rtol=TOL)
    assert abs(got[1] - want[1]) > 1e-2
