"""ORQA / REALM open-QA fine-tuning: the losses hand-computed (dropped rows, masked spans),
best-span extraction (never outside the passage, never wider than the limit), answer-span
marking with the evaluation's normalization, the loss and gradients sharded on 8 emulated
devices equal to one device's, and a tiny fine-tuning run on Wikipedia sample text (MiniLM
weights) through the trainer, the frozen index built by the refresher from the same
weights, that raises exact match above the untrained reader's."""

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


# ---------------------------------------------------------------------------------------
# Sharded: the loss and gradients on 8 emulated devices equal one device's

SPECIAL = SpecialIds(cls=1, sep=2, mask=3, pad=0)
B, Q, C, R, K, N, NUM_VALID = 8, 12, 10, 6, 3, 64, 61


def _numpy_params(cfg, seed: int, std: float = 0.05) -> dict:
    from tiny_corpus import numpy_params
    return numpy_params(cfg, seed, std)


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny config's two parts, one layer each, random."""
    from realm_jax.models import EmbedderConfig, SpanReaderConfig
    from realm_jax.tasks import orqa as train_orqa

    c = config_lib.load_config("orqa:tiny", "model.encoder.num_layers=1")
    enc = config_lib.encoder_config(c.model.encoder)
    configs = {"query_tower": EmbedderConfig(enc, pooling="pooler", projection_dim=16,
                                             projection_layer_norm=True),
               "reader": SpanReaderConfig(enc.replace(add_pooler=False), span_hidden_size=32)}
    params = {part: _numpy_params(cfg, i) for i, (part, cfg) in enumerate(configs.items())}
    model = train_orqa.OrqaModel(configs, SPECIAL, beam_size=R, num_read=K, score_scale=1.0,
                                 num_valid=NUM_VALID, block_size=8)
    return model, params


def _synthetic(seed=0):
    rng = np.random.default_rng(seed)
    corpus = {"embeddings": rng.normal(size=(N, 16)).astype(np.float32),
              "lengths": rng.integers(2, C + 1, N).astype(np.int32)}
    corpus["tokens"] = np.where(np.arange(C) < corpus["lengths"][:, None],
                                rng.integers(4, 128, (N, C)), 0).astype(np.int32)
    n_q = rng.integers(3, Q + 1, B)
    ids = np.where(np.arange(Q) < n_q[:, None], rng.integers(4, 128, (B, Q)), 0)
    ids[:, 0] = SPECIAL.cls
    ids[np.arange(B), n_q - 1] = SPECIAL.sep
    beam = np.stack([rng.permutation(NUM_VALID)[:R] for _ in range(B)]).astype(np.int32)
    beam[1, -2:] = -1                                     # empty slots
    retrieval_correct = rng.random((B, R)) < 0.3
    retrieval_correct[2] = False                          # a dropped retrieval term
    span_correct = rng.random((B, K, orqa.num_spans(Q + C, 10))) < 0.02
    span_correct[3] = False                               # a dropped reader term
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": (ids != 0).astype(np.int32),
             "beam_ids": beam, "retrieval_correct": retrieval_correct,
             "span_correct": span_correct}
    return batch, corpus


def _loss_and_grads(model, params, batch, corpus, mesh):
    from realm_jax.index.device import corpus_sharding

    rules = sharding.DEFAULT_RULES
    p_shardings = sharding.part_shardings(model.configs, mesh, rules)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rows = NamedSharding(mesh, PartitionSpec(corpus_sharding(mesh, rules).spec[0]))
    fn = jax.jit(jax.value_and_grad(lambda p, b, c: model.loss(p, b, c, None), has_aux=True),
                 in_shardings=(p_shardings, batch_sharding, rows),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))
    args = (sharding.place(params, p_shardings),
            {k: jax.device_put(v, batch_sharding) for k, v in batch.items()},
            {k: jax.device_put(v, rows) for k, v in corpus.items()})
    with sharding.activate(mesh, rules):
        (loss, metrics), grads = fn.lower(*args).compile(FAST)(*args)
    return jax.device_get((loss, metrics, grads))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_loss_and_gradients_sharded_equal_one_device(tiny_model):
    model, params = tiny_model
    batch, corpus = _synthetic()
    one = _loss_and_grads(model, params, batch, corpus,
                          sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    loss, metrics, grads = one
    assert np.isfinite(loss) and loss > 0
    assert int(metrics["retrieval_dropped"]) == 1 and int(metrics["reader_dropped"]) >= 1
    for part in ("query_tower", "reader"):      # the loss trains both parts
        assert max(np.abs(g).max() for g in jax.tree.leaves(grads[part])) > 0, part
    # data x fsdp x tensor: batch over 4, parameters over fsdp and tensor, corpus over 8.
    got_loss, got_metrics, got_grads = _loss_and_grads(model, params, batch, corpus,
                                                       sharding.make_mesh((2, 2, 2)))
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    assert int(got_metrics["retrieval_dropped"]) == 1
    for part in ("query_tower", "reader"):   # (compared against the part's gradient scale)
        scale = max(np.abs(g).max() for g in jax.tree.leaves(grads[part]))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
                     got_grads[part], grads[part])


# ---------------------------------------------------------------------------------------
# A tiny fine-tuning run on real text


@pytest.fixture(scope="module")
def wiki_store(tmp_path_factory, wiki_sample_path, minilm_path):
    """The beginnings (~600 characters) of ten Wikipedia sample articles, in REALM blocks
    of at most 40 wordpieces (about 40 blocks)."""
    from realm_jax.data import Document, SkipCounter, prepare_corpus, read_wiki_xml

    docs = []
    for doc in read_wiki_xml(wiki_sample_path, SkipCounter()):
        cut = doc.text.rfind(" ", 0, 600)
        docs.append(Document(doc.doc_id, doc.title, doc.text[:cut],
                             [s for s in doc.spans if s.end <= cut]))
        if len(docs) == 10:
            break
    out = tmp_path_factory.mktemp("orqa") / "store"
    return str(prepare_corpus(docs, out, tokenizer=minilm_path, mode="realm", max_tokens=40,
                              progress=False).path)


@pytest.fixture(scope="module")
def minilm_1layer(tmp_path_factory, minilm_path):
    """all-MiniLM-L6-v2 cut to its first layer, as a Hugging Face folder (sentence-
    transformers pooling kept): both towers' and the reader encoder's weights."""
    from realm_jax import hf

    cfg, params = hf.load_embedder(minilm_path)
    enc = params["encoder"]
    folder = tmp_path_factory.mktemp("minilm_1layer")
    hf.save(folder, cfg.encoder.replace(num_layers=1),
            {**enc, "layers": {"layers_0": enc["layers"]["layers_0"]}})
    src = minilm_path if isinstance(minilm_path, str) else str(minilm_path)
    shutil.copy(f"{src}/modules.json", folder / "modules.json")
    shutil.copytree(f"{src}/1_Pooling", folder / "1_Pooling")
    return str(folder)


def _orqa_config(store, tokenizer, model, *overrides):
    return config_lib.load_config("orqa:tiny", *(
        f"data.corpus={store}", f"data.tokenizer={tokenizer}", f"model.init_from_hf={model}",
        "data.cloze_questions=8", "data.eval_split=train", "train.eval_questions=8",
        "retrieval.query_length=32", "retrieval.block_length=40", "mesh.shape=(1,8,1)",
        "train.steps=4", "train.checkpoint_every=100", "train.fast_compile=True",
        "eval.batch_size=8", *overrides))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, wiki_store, minilm_1layer, minilm_path):
    """`realm-jax refresh --once --from_hf` builds the frozen index, then the trainer
    fine-tunes on eight cloze questions (evaluated on the same ones: a test of the
    machinery, not of generalization)."""
    from realm_jax import refresh
    from realm_jax.train import trainer

    config = _orqa_config(wiki_store, minilm_path, minilm_1layer)
    workdir = tmp_path_factory.mktemp("orqa_run")
    refresh.main(config, workdir, once=True, from_hf=minilm_1layer, progress=False)
    return config, workdir, trainer.train(config, workdir)


def test_fine_tuning_raises_exact_match(finetuned):
    from realm_jax.train.metrics import read_metrics

    config, workdir, result = finetuned
    before, after = result["first_eval"], result["last_eval"]
    print(f"exact match {before['eval_exact_match']:.3f} -> {after['eval_exact_match']:.3f}, "
          f"recall@1 {before['eval_recall@1']:.3f} -> {after['eval_recall@1']:.3f}")
    assert before["step"] == 0 and after["step"] == 4
    assert after["eval_exact_match"] > before["eval_exact_match"]
    assert after["eval_exact_match"] >= 0.5
    assert before["eval_recall@3"] >= 0.75          # MiniLM finds the cloze's own block
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 5))
    assert rows[-1]["reader_loss"] < rows[0]["reader_loss"]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(
            r["retrieval_loss"] + r["reader_loss"], rel=1e-5)
        assert r["read_recall"] > 0 and r["reader_dropped"] < 8
    # The query tower is trained too (retrieval and reader losses both reach it).
    from realm_jax.tasks import orqa as train_orqa
    _, initial = train_orqa.build_models(config)
    trained = jax.device_get(result["final_state"].params)
    for part in ("query_tower", "reader"):
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), initial[part],
                                             trained[part]))
        assert max(moved) > 0, part
    from realm_jax.checkpoints import TrainCheckpoints
    assert TrainCheckpoints(workdir).is_finished()


def test_predictions_read_the_retrieved_blocks_and_cli(finetuned, capsys):
    """realm-jax eval and answer on the run: the predictions' recall@k counts the very blocks
    the reader read, every answer is text of the block it came from."""
    from realm_jax import cli, evaluate
    from realm_jax.data.store import BlockStore

    config, workdir, result = finetuned
    assert cli.main(["eval", "--workdir", str(workdir), "--config.eval.num_questions=8"]) == 0
    out = capsys.readouterr().out
    assert "| questions | EM | R@1 | R@3 |" in out
    predictions = evaluate.read_predictions(workdir / "eval" / "predictions.jsonl")
    summary = evaluate.summarize(predictions, ks=(1, 3))
    assert summary["exact_match"] == pytest.approx(result["last_eval"]["eval_exact_match"])
    store = BlockStore.open(config.data.corpus)
    hits = []
    for p in predictions:
        assert len(p.passages) == 3
        texts = [store.text(q.id) for q in p.passages]
        hits.append([evaluate.has_answer(t, p.gold_answers) for t in texts])
        assert [q.has_answer for q in p.passages] == hits[-1]
        if p.answer:
            assert any(p.answer in t for t in texts)
    assert summary["recall@3"] == evaluate.recall_at_k(hits, (3,))[3]
    question = predictions[0].question
    assert cli.main(["answer", "--workdir", str(workdir), question]) == 0
    out = capsys.readouterr().out
    assert f"Q: {question}" in out and f"A: {predictions[0].answer}" in out


def test_models_from_a_realm_run_and_a_realm_reader_folder(tmp_path, tiny_model):
    """model.init_from_realm: the query tower and the reader's encoder of a REALM
    pre-training checkpoint (the span head new); model.reader_hf: a RealmReader folder
    whole (its span head too)."""
    from realm_jax import hf
    from realm_jax.models import MaskedLMConfig
    from realm_jax.tasks import orqa as train_orqa
    from realm_jax.checkpoints import TrainCheckpoints

    model, params = tiny_model
    tower, reader = model.configs["query_tower"], model.configs["reader"]
    mlm = MaskedLMConfig(reader.encoder)
    realm_params = {"query_tower": params["query_tower"], "doc_tower": params["query_tower"],
                    "reader": _numpy_params(mlm, 7)}
    with TrainCheckpoints(tmp_path / "realm") as ckpts:
        ckpts.layout.write_model({"query_tower": tower, "doc_tower": tower, "reader": mlm})
        ckpts.save(3, realm_params)
    config = config_lib.load_config("orqa:tiny", "model.encoder.num_layers=1",
                                    f"model.init_from_realm={tmp_path / 'realm'}")
    configs, got = train_orqa.build_models(config)
    assert configs["query_tower"] == tower and configs["reader"].encoder == reader.encoder
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(got["query_tower"], params["query_tower"])
    same(got["reader"]["encoder"], realm_params["reader"]["encoder"])
    assert set(got["reader"]) == set(params["reader"])       # a span head of the right shape

    folder = hf.save(tmp_path / "realm_reader", reader, params["reader"])
    config = config_lib.load_config("orqa:tiny", f"model.reader_hf={folder}",
                                    "model.max_span_width=4")
    configs, got = train_orqa.build_models(config)
    assert configs["reader"].max_span_width == 4
    same(got["reader"], params["reader"])


def test_answer_matcher_contains_is_has_answer(tmp_path, tokenizer):
    """The beam's retrieval targets: has_answer exactly, through the substring prefilter
    (case folding, NFKC, punctuation and articles), empty slots False."""
    from realm_jax.data import Document, prepare_corpus
    from realm_jax.data.answers import AnswerMatcher
    from realm_jax.data.store import BlockStore
    from realm_jax.evaluate import has_answer

    texts = ["The Beatles were an English rock band formed in Liverpool in 1960.",
             "ΟΔΟΣ is Greek; Straße; Café; ½ cup; U.S. politics; the Beatles' album.",
             "Nothing to see here."]
    path = prepare_corpus([Document(str(i), f"t{i}", t) for i, t in enumerate(texts)],
                          tmp_path / "store", tokenizer=tokenizer, mode="dpr",
                          passage_words=100, progress=False).path
    matcher = AnswerMatcher(BlockStore.open(path), tokenizer)
    for answers in (["liverpool"], ["οδος"], ["strasse"], ["Café"], ["cafe"], ["1/2"],
                    ["US"], ["u.s."], ["the Beatles"], ["the"], ["zzz", "rock band"]):
        want = [has_answer(t, answers) for t in texts]
        assert matcher.contains([0, 1, 2, -1], answers).tolist() == want + [False], answers
    assert matcher.contains([0, 1], [r"\d{4}"], regex=True).tolist() == [True, False]


def test_cli_refuses_clearly(tmp_path, capsys):
    from realm_jax import cli

    assert cli.main(["eval", "--workdir", str(tmp_path), "--config", "configs/orqa.py:tiny"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert cli.main(["answer", "--workdir", str(tmp_path), "--config", "configs/realm.py:tiny",
                     "who?"]) == 2
    assert "config.task='realm'" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2     # no --config, no config.json
    assert "config.json: missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="retrieval.num_read"):
        from realm_jax.tasks.orqa import check_config
        check_config(config_lib.load_config("orqa:tiny", "data.corpus=c", "data.tokenizer=t",
                                            "retrieval.num_read=9"))
