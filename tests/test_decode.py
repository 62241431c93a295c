"""RAG decoding: RAG-Token greedy and beam search and RAG-Sequence thorough decoding give the
sequences transformers' PyTorch RagTokenForGeneration / RagSequenceForGeneration.generate
give on the same tiny weights, contexts and document scores; fast decoding agrees with
thorough decoding with a single document; the same results on sharded meshes. Sampling
(temperature, top-k, top-p) draws from the right set on a fixed distribution, is greedy with
top_k=1 or a temperature near 0, and repeats itself with the same key."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import hf, sharding
from realm_jax.decode import (
    GenerationConfig, Generated, beam_search, greedy_search, rag_sequence_generate,
    rag_token_generate, sample_search, trim)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Compiling is most of these tests' time; XLA's backend optimizations double it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
B, K, L, V = 4, 3, 12, 64
PAD, BOS, EOS = 1, 0, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """PyTorch RAG-Token and RAG-Sequence models sharing one DPR + BART (wide init and an
    eos bias, so that the documents differ and hypotheses end at different lengths), and
    the same weights read back through hf.load."""
    tr = transformers
    q = tr.DPRConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    g = tr.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.5)
    config = tr.RagConfig.from_question_encoder_generator_configs(q, g, n_docs=K)
    torch.manual_seed(1)
    token = tr.RagTokenForGeneration(config).eval()
    with torch.no_grad():
        token.rag.generator.final_logits_bias.zero_()
        token.rag.generator.final_logits_bias[0, EOS] = 8.0
    sequence = tr.RagSequenceForGeneration(config, question_encoder=token.rag.question_encoder,
                                           generator=token.rag.generator).eval()
    folder = tmp_path_factory.mktemp("rag")
    token.save_pretrained(folder, safe_serialization=True)
    cfg, params = hf.load(folder)
    assert cfg.forced_eos_token_id == EOS and cfg.forced_bos_token_id is None
    return token, sequence, cfg, params


def _inputs(seed=0):
    """Contexts [B, K, L], right-padded (the mask is ids != pad, as transformers' RAG-Sequence
    derives it), and document scores [B, K]."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(3, V, (B, K, L)).astype(np.int32)
    mask = np.ones_like(ctx)
    for b, k, n in ((0, 1, 7), (2, 2, 4), (3, 0, 9)):
        ctx[b, k, n:], mask[b, k, n:] = PAD, 0
    return ctx, mask, (2.0 * rng.normal(size=(B, K))).astype(np.float32)


_COMPILED: dict = {}


def _run(fn, params, ctx, mask, scores, rng=None, **static):
    """`fn` (a jitted decoder) compiled once per (static settings, shapes, shardings)."""
    key = (fn, tuple(sorted(static.items())), ctx.shape,
           str(getattr(params["generator"]["shared"]["embedding"], "sharding", None)))
    extra = {} if rng is None else {"rng": rng}
    if key not in _COMPILED:
        _COMPILED[key] = fn.lower(params, ctx, mask, scores, **extra, **static).compile(
            FAST_COMPILE)
    return _COMPILED[key](params, ctx, mask, scores, **extra)


def _torch_generate(model, ctx, mask, scores, **settings):
    t = lambda a: torch.from_numpy(np.asarray(a, np.int64).reshape(-1, a.shape[-1]))
    with torch.no_grad():
        return model.generate(context_input_ids=t(ctx), context_attention_mask=t(mask),
                              doc_scores=torch.from_numpy(scores), n_docs=ctx.shape[1],
                              **settings).numpy()


TOKEN_SETTINGS = [
    dict(num_beams=1, max_length=10),                                             # greedy
    dict(num_beams=3, max_length=10, num_return_sequences=3),
    dict(num_beams=2, max_length=9, min_length=5, length_penalty=0.5, early_stopping=True,
         forced_bos_token_id=BOS),
]


@pytest.mark.parametrize("settings", TOKEN_SETTINGS, ids=["greedy", "beam3", "beam2-min-bos"])
def test_rag_token_matches_transformers(models, settings):
    token, _, cfg, params = models
    ctx, mask, scores = _inputs()
    gen = GenerationConfig.from_rag(cfg, **settings)
    out = _run(rag_token_generate, params, ctx, mask, scores, config=cfg, gen=gen)
    assert out.sequences.shape == (B, gen.num_return_sequences, gen.max_length)
    want = _torch_generate(token, ctx, mask, scores, **settings)
    got = trim(out)
    np.testing.assert_array_equal(got, want)
    if settings["num_beams"] == 1:
        ends = [list(r).index(EOS, 1) + 1 if EOS in r[1:] else len(r) for r in got]
        assert len(set(ends)) > 1      # some stop early, the rest are padded
    else:
        assert np.all(np.diff(np.asarray(out.scores), axis=1) <= 0)   # best first
    assert np.all(got[:, 0] == cfg.generator.decoder_start_token_id)


@pytest.mark.parametrize("settings", [
    dict(num_beams=2, max_length=10, num_return_sequences=2, forced_bos_token_id=BOS),
], ids=["beam2-bos"])
def test_rag_sequence_thorough_matches_transformers(models, settings):
    _, sequence, cfg, params = models
    ctx, mask, scores = _inputs()
    gen = GenerationConfig.from_rag(cfg, **settings)
    out = _run(rag_sequence_generate, params, ctx, mask, scores, config=cfg, gen=gen)
    want = _torch_generate(sequence, ctx, mask, scores, **settings)
    got = trim(out)
    # transformers pads every question's sequences to its longest hypothesis, returned or not
    assert got.shape[1] <= want.shape[1] and np.all(want[:, got.shape[1]:] == PAD)
    np.testing.assert_array_equal(got, want[:, :got.shape[1]])
    # the scores are log p(y|x) as transformers' rescoring pass computes it (its loss)
    t = lambda a: torch.from_numpy(np.asarray(a, np.int64))
    for b in range(B):
        seqs = np.asarray(out.sequences[b])
        with torch.no_grad():
            loss = sequence(context_input_ids=t(np.tile(ctx[b], (len(seqs), 1))),
                            context_attention_mask=t(np.tile(mask[b], (len(seqs), 1))),
                            doc_scores=torch.from_numpy(np.tile(scores[b], (len(seqs), 1))),
                            labels=t(seqs), exclude_bos_score=True, n_docs=K).loss.numpy()
        np.testing.assert_allclose(np.asarray(out.scores[b]), -loss, rtol=1e-4, atol=1e-4)


def test_fast_decoding_equals_thorough_with_one_document(models):
    """With one document every hypothesis comes from its beam, so fast decoding's
    p(y|x, z) is never counted as 0: the same sequences and scores."""
    _, _, cfg, params = models
    ctx, mask, scores = _inputs(seed=3)
    ctx, mask, scores = ctx[:, :1], mask[:, :1], scores[:, :1]
    gen = GenerationConfig.from_rag(cfg, num_beams=2, max_length=8, num_return_sequences=2)
    thorough = _run(rag_sequence_generate, params, ctx, mask, scores, config=cfg, gen=gen)
    fast = _run(rag_sequence_generate, params, ctx, mask, scores, config=cfg, gen=gen,
                fast=True)
    np.testing.assert_array_equal(fast.sequences, thorough.sequences)
    np.testing.assert_allclose(fast.scores, thorough.scores, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(fast.scores)))


def test_fast_decoding_counts_missing_beams_as_zero(models):
    """With several documents, fast decoding's estimate of p(y|x) sums only the documents
    whose beam produced y: never more than thorough decoding's (which sums them all)."""
    _, _, cfg, params = models
    ctx, mask, scores = _inputs()
    gen = GenerationConfig.from_rag(cfg, num_beams=2, max_length=10, num_return_sequences=2,
                                    forced_bos_token_id=BOS)
    thorough = _run(rag_sequence_generate, params, ctx, mask, scores, config=cfg, gen=gen)
    fast = _run(rag_sequence_generate, params, ctx, mask, scores, config=cfg, gen=gen,
                fast=True)
    for b in range(B):
        t_seqs = [tuple(s) for s in np.asarray(thorough.sequences[b])]
        for seq, score in zip(np.asarray(fast.sequences[b]), np.asarray(fast.scores[b])):
            if tuple(seq) in t_seqs:
                want = np.asarray(thorough.scores[b])[t_seqs.index(tuple(seq))]
                assert score <= want + 1e-5


def test_generic_searches_on_a_fixed_distribution():
    """A step function with a fixed next-token table: greedy follows the argmax; beam search
    finds the sequence greedy misses and honours min_length and forced eos."""
    a, b_, eos, pad, start = range(5)
    table = np.full((5, 5), 1e-9)
    table[start, a], table[start, b_] = 0.6, 0.4
    table[a, eos], table[a, a], table[a, b_] = 0.4, 0.3, 0.3
    table[b_, eos], table[b_, a] = 0.9, 0.1
    table[eos, pad] = table[pad, pad] = 1.0
    logits = jnp.log(jnp.asarray(table / table.sum(1, keepdims=True), jnp.float32))

    def step(state, tokens):
        return logits[tokens], state

    base = GenerationConfig(max_length=4, decoder_start_token_id=start, eos_token_id=eos,
                            pad_token_id=pad, bos_token_id=None)
    g = jax.jit(lambda: greedy_search(step, (), 2, base))()
    np.testing.assert_array_equal(g.sequences[:, 0], [[start, a, eos, pad]] * 2)
    np.testing.assert_allclose(g.scores[:, 0], np.log(0.6 * 0.4), rtol=1e-5)
    gen = base.replace(num_beams=2, length_penalty=0.0)
    h = jax.jit(lambda: beam_search(step, (), lambda s, r: s, 1, gen))()
    np.testing.assert_array_equal(h.sequences[0], [[start, b_, eos, pad], [start, a, eos, pad]])
    np.testing.assert_allclose(h.scores[0], np.log([0.36, 0.24]), rtol=1e-5)
    np.testing.assert_array_equal(h.lengths[0], [3, 3])
    longer = gen.replace(min_length=3, max_length=5, forced_eos_token_id=eos)
    h = jax.jit(lambda: beam_search(step, (), lambda s, r: s, 1, longer))()
    for seq, n in zip(np.asarray(h.sequences[0]), np.asarray(h.lengths[0])):
        assert eos not in seq[:3] and seq[n - 1] == eos and n >= 4


SAMPLE_PROBS = (0.5, 0.3, 0.15, 0.05)          # tokens 0..3; 4 eos, 5 pad, 6 start


@functools.lru_cache(maxsize=None)
def _sampler(settings: tuple):
    """sample_search over 8000 rows of the fixed distribution SAMPLE_PROBS (after the start
    token), compiled once per settings."""
    table = np.zeros((7, 7))
    table[:, 5] = 1.0
    table[6] = (*SAMPLE_PROBS, 0, 0, 0)
    with np.errstate(divide="ignore"):
        logits = jnp.asarray(np.log(table), jnp.float32)
    gen = GenerationConfig(max_length=2, decoder_start_token_id=6, eos_token_id=4,
                           pad_token_id=5, bos_token_id=None, do_sample=True,
                           **({"top_k": 0} | dict(settings)))
    fn = jax.jit(lambda k: sample_search(lambda s, t: (logits[t], s), (), 8000, gen, k))
    return fn.lower(jax.random.key(0)).compile(FAST_COMPILE)


def _draw(key, **settings):
    """One sampled token per row, and its score."""
    out = _sampler(tuple(sorted(settings.items())))(key)
    return np.asarray(out.sequences[:, 0, 1]), np.asarray(out.scores[:, 0])


def _frequencies(tokens):
    return np.bincount(tokens, minlength=7)[:4] / len(tokens)


def test_sampling_on_a_fixed_distribution():
    """Plain sampling follows the distribution; top-k and top-p sample only from their set
    (renormalized); temperature sharpens; top_k=1 or a temperature near 0 is greedy; the
    same key gives the same samples."""
    key = jax.random.key(0)
    p = np.asarray(SAMPLE_PROBS)
    tokens, scores = _draw(key)
    assert set(tokens) == {0, 1, 2, 3}
    np.testing.assert_allclose(_frequencies(tokens), p, atol=0.025)
    np.testing.assert_allclose(scores, np.log(p[tokens]), rtol=1e-5)   # unwarped log p
    np.testing.assert_array_equal(_draw(key)[0], tokens)
    assert np.mean(_draw(jax.random.key(1))[0] != tokens) > 0.3
    tokens = _draw(key, top_k=2)[0]
    assert set(tokens) == {0, 1}
    np.testing.assert_allclose(_frequencies(tokens), [0.625, 0.375, 0, 0], atol=0.025)
    # top-p: a token goes when it and the less likely ones hold at most 1 - top_p
    for top_p, kept in ((0.4, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2})):
        assert set(_draw(key, top_p=top_p)[0]) == kept, top_p
    # top-k first, then top-p on what is left: {0, 1, 2} renormalized, 2 holds 0.158 <= 0.2
    assert set(_draw(key, top_k=3, top_p=0.8)[0]) == {0, 1}
    sharp = p ** 2 / np.sum(p ** 2)                                      # temperature 0.5
    np.testing.assert_allclose(_frequencies(_draw(key, temperature=0.5)[0]), sharp, atol=0.025)
    assert set(_draw(key, temperature=1e-4)[0]) == {0}
    assert set(_draw(key, top_k=1, temperature=5.0)[0]) == {0}


SAMPLE_SETTINGS = dict(max_length=10, do_sample=True)


def test_rag_token_sampling_greedy_limits_and_keys(models):
    """On the model: top_k=1 at a high temperature decodes as greedy search (a temperature
    near 0 is checked on the fixed distribution); num_return_sequences samples are drawn
    per question, and the same key gives the same samples."""
    _, _, cfg, params = models
    ctx, mask, scores = _inputs()
    greedy = _run(rag_token_generate, params, ctx, mask, scores, config=cfg,
                  gen=GenerationConfig.from_rag(cfg, **TOKEN_SETTINGS[0]))
    key = jax.random.key(7)
    gen = GenerationConfig.from_rag(cfg, **SAMPLE_SETTINGS, top_k=1, temperature=3.0)
    got = _run(rag_token_generate, params, ctx, mask, scores, rng=key, config=cfg, gen=gen)
    np.testing.assert_array_equal(got.sequences, greedy.sequences)
    np.testing.assert_array_equal(got.lengths, greedy.lengths)
    np.testing.assert_allclose(got.scores, greedy.scores, rtol=1e-5, atol=1e-5)
    gen = GenerationConfig.from_rag(cfg, **SAMPLE_SETTINGS, top_k=0, num_return_sequences=3)
    first = _run(rag_token_generate, params, ctx, mask, scores, rng=key, config=cfg, gen=gen)
    again = _run(rag_token_generate, params, ctx, mask, scores, rng=key, config=cfg, gen=gen)
    other = _run(rag_token_generate, params, ctx, mask, scores, rng=jax.random.key(8),
                 config=cfg, gen=gen)
    assert first.sequences.shape == (B, 3, gen.max_length)
    np.testing.assert_array_equal(first.sequences, again.sequences)
    assert not np.array_equal(first.sequences, other.sequences)
    seqs = np.asarray(first.sequences)
    assert any(len({tuple(s) for s in seqs[b]}) > 1 for b in range(B))   # rows differ
    assert np.all(seqs[:, :, 0] == cfg.generator.decoder_start_token_id)


def test_settings_are_checked(models):
    _, _, cfg, params = models
    with pytest.raises(ValueError, match="max_length"):
        GenerationConfig(max_length=1)
    with pytest.raises(ValueError, match="early_stopping"):
        GenerationConfig(early_stopping="sometimes")
    ctx, mask, scores = _inputs()
    with pytest.raises(ValueError, match="num_return_sequences"):
        rag_token_generate(params, ctx, mask, scores, config=cfg,
                           gen=GenerationConfig.from_rag(cfg, num_beams=2, num_return_sequences=3))
    with pytest.raises(ValueError, match="doc_scores"):
        rag_token_generate(params, ctx, mask, scores[:, :2], config=cfg,
                           gen=GenerationConfig.from_rag(cfg))
    assert GenerationConfig.from_rag(cfg).forced_eos_token_id == EOS
    for bad, message in ((dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
                         (dict(top_k=-1), "top_k"),
                         (dict(do_sample=True, num_beams=2), "beam sampling")):
        with pytest.raises(ValueError, match=message):
            GenerationConfig(**bad)
    sample = GenerationConfig.from_rag(cfg, do_sample=True)
    with pytest.raises(ValueError, match="do_sample needs rng"):
        rag_token_generate(params, ctx, mask, scores, config=cfg, gen=sample)
    with pytest.raises(ValueError, match="not RAG-Sequence"):
        rag_sequence_generate(params, ctx, mask, scores, config=cfg, gen=sample)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (4, 1, 2)])
def test_sharded_decoding_matches_single_device(models, mesh_shape):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (emulated) devices")
    _, _, cfg, params = models
    ctx, mask, scores = _inputs()
    mesh = sharding.make_mesh(mesh_shape)
    shardings = sharding.param_shardings(
        lambda rng: cfg.module().init(rng, **cfg.example_inputs()), jax.random.key(0),
        mesh=mesh)["params"]
    placed = sharding.place(params, shardings)
    wi = placed["generator"]["decoder"]["layers"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.shard_shape(wi.shape)[1] == 64 // mesh_shape[2]     # mlp over tensor
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    ctx_s, mask_s, scores_s = (jax.device_put(x, rows) for x in (ctx, mask, scores))
    cases = [(rag_token_generate, TOKEN_SETTINGS[1], {})]
    if mesh_shape == (2, 1, 4):
        cases.append((rag_sequence_generate,
                      dict(num_beams=2, max_length=10, num_return_sequences=2,
                           forced_bos_token_id=BOS), {}))
    for fn, settings, extra in cases:
        gen = GenerationConfig.from_rag(cfg, **settings)
        with sharding.activate(mesh):
            got = _run(fn, placed, ctx_s, mask_s, scores_s, config=cfg, gen=gen, **extra)
        want = _run(fn, params, ctx, mask, scores, config=cfg, gen=gen, **extra)
        assert isinstance(got, Generated)
        np.testing.assert_array_equal(got.sequences, want.sequences)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
