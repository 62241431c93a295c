"""The RAG model: loss and gradients equal transformers' RagToken/RagSequence on the same
weights and contexts (document scores from the live question encoder, so it trains); a
sharded loss and gradient; the Hugging Face RAG folder both ways; retrieval from both search
backends and contexts built as transformers' RagRetriever builds them; a tiny fine-tuning
run on Wikipedia passages."""

import dataclasses
import functools
import json
import re
import string
import types

import jax
import numpy as np
import pytest
from flax import linen as nn

from realm_jax import hf, sharding
from realm_jax.index import DeviceSearcher, NumpySearcher
from realm_jax.models.bart import BartConfig, shift_tokens_right
from realm_jax.models.rag import (
    Rag, RagConfig, build_contexts, context_string, join_context_ids, retrieve)
from realm_jax.objectives import rag_sequence_nll, rag_token_nll, shift_targets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAST_COMPILE = {"xla_backend_optimization_level": 0}
B, K, S, L, T, V = 4, 3, 7, 10, 8, 64
PAD, BOS, EOS = 1, 0, 2
TOL = 1e-4


@pytest.fixture(scope="module")
def torch_rag(tmp_path_factory):
    """transformers' RagToken and RagSequence on one tiny DPR + BART, written as a RAG folder
    and read back with hf.load."""
    tr = transformers
    q = tr.DPRConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    g = tr.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                      decoder_ffn_dim=48, max_position_embeddings=64, init_std=0.3)
    config = tr.RagConfig.from_question_encoder_generator_configs(q, g, n_docs=K,
                                                                  max_combined_length=L)
    torch.manual_seed(0)
    token = tr.RagTokenForGeneration(config).eval()
    with torch.no_grad():
        token.rag.generator.final_logits_bias.normal_(0, 0.5)
    token.generation_config.forced_bos_token_id = BOS    # (written to generation_config.json)
    sequence = tr.RagSequenceForGeneration(config, question_encoder=token.rag.question_encoder,
                                           generator=token.rag.generator).eval()
    folder = tmp_path_factory.mktemp("rag_token")
    token.save_pretrained(folder, safe_serialization=True)
    cfg, params = hf.load(folder)
    return {"token": token, "sequence": sequence}, folder, cfg, params


def _batch(seed=0):
    """Questions [B, S] (DPR vocabulary), document embeddings [B, K, P], right-padded
    contexts [B, K, L] and labels [B, T] (bos ... eos, pads; at least two scored targets)."""
    rng = np.random.default_rng(seed)
    q_ids = rng.integers(3, V, (B, S)).astype(np.int32)
    q_mask = np.ones_like(q_ids)
    q_ids[1, 4:], q_mask[1, 4:] = 0, 0
    docs = rng.normal(size=(B, K, 32)).astype(np.float32)
    ctx = rng.integers(3, V, (B, K, L)).astype(np.int32)
    ctx_mask = np.ones_like(ctx)
    for b, k, n in ((0, 1, 6), (2, 2, 3), (3, 0, 8)):
        ctx[b, k, n:], ctx_mask[b, k, n:] = PAD, 0
    labels = rng.integers(3, V, (B, T)).astype(np.int32)
    labels[:, 0] = BOS
    for row, n in ((0, T), (1, 5), (2, 3), (3, 6)):
        labels[row, n - 1], labels[row, n:] = EOS, PAD
    return q_ids, q_mask, docs, ctx, ctx_mask, labels


def _t(a):
    return torch.from_numpy(np.asarray(a))


def _torch_loss_and_grads(model, batch, kind, eps):
    """transformers' loss with the document scores from its own question encoder, and the
    gradients of the question encoder's word embeddings and BART's shared embedding."""
    q_ids, q_mask, docs, ctx, ctx_mask, labels = batch
    model.zero_grad()
    model.config.label_smoothing = eps
    q = model.question_encoder(_t(q_ids).long(), attention_mask=_t(q_mask).long())[0]
    scores = torch.bmm(q.unsqueeze(1), _t(docs).transpose(1, 2)).squeeze(1)
    out = model(context_input_ids=_t(ctx.reshape(B * K, L)).long(),
                context_attention_mask=_t(ctx_mask.reshape(B * K, L)).long(),
                doc_scores=scores, labels=_t(labels).long(), n_docs=K, reduce_loss=True)
    out.loss.backward()
    words = model.rag.question_encoder.question_encoder.bert_model.embeddings.word_embeddings
    return (out.loss.item(), scores.detach().numpy(), words.weight.grad.numpy(),
            model.rag.generator.model.shared.weight.grad.numpy())


def _loss(cfg, params, batch, kind, eps):
    q_ids, q_mask, docs, ctx, ctx_mask, labels = batch
    out = cfg.module().apply({"params": params}, q_ids, q_mask, docs, ctx, ctx_mask, labels)
    fn = rag_token_nll if kind == "token" else rag_sequence_nll
    loss = fn(out.logits, shift_targets(labels, PAD), out.doc_scores, pad_id=PAD, epsilon=eps)
    return loss, out.doc_scores


_COMPILED: dict = {}


def _compiled(cfg, kind, eps, params, batch):
    """The jitted loss and gradient, compiled once per setting."""
    key = (cfg, kind, eps)
    if key not in _COMPILED:
        fn = jax.value_and_grad(functools.partial(_loss, cfg, kind=kind, eps=eps), has_aux=True)
        _COMPILED[key] = jax.jit(fn).lower(params, batch).compile(FAST_COMPILE)
    return _COMPILED[key]


@pytest.mark.parametrize("kind, eps", [("token", 0.0), ("sequence", 0.1)])
def test_loss_and_gradients_match_transformers(torch_rag, kind, eps):
    models, _, cfg, params = torch_rag
    batch = _batch(seed=len(kind))
    want_loss, want_scores, want_q_grad, want_g_grad = _torch_loss_and_grads(
        models[kind], batch, kind, eps)
    (loss, scores), grads = _compiled(cfg, kind, eps, params, batch)(params, batch)
    np.testing.assert_allclose(scores, want_scores, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
    q_grad = grads["question_encoder"]["encoder"]["word_embeddings"]["embedding"]
    for got, want in ((q_grad, want_q_grad), (grads["generator"]["shared"]["embedding"],
                                              want_g_grad)):
        # (float32 sums of ~100 nats: compared against the gradient's scale)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        assert np.linalg.norm(got - want) < 1e-4 * np.linalg.norm(want)
    # the loss trains the question encoder: every one of its tensors gets a gradient
    for path, g in jax.tree_util.tree_flatten_with_path(grads["question_encoder"])[0]:
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_forward_pieces_and_shapes(torch_rag):
    models, _, cfg, params = torch_rag
    q_ids, q_mask, docs, ctx, ctx_mask, labels = _batch()
    model = cfg.module()

    def pieces(params, docs):
        out = model.apply({"params": params}, q_ids, q_mask, docs, ctx, ctx_mask, labels)
        q = model.apply({"params": params}, q_ids, q_mask, method=Rag.embed_questions)
        no_grad = jax.grad(lambda d: model.apply({"params": params}, q_ids, q_mask, d,
                                                 method=Rag.doc_scores).sum())(docs)
        return out, q, no_grad

    out, q, no_grad = jax.jit(pieces).lower(params, docs).compile(FAST_COMPILE)(params, docs)
    assert out.logits.shape == (B, K, T, V) and out.doc_scores.shape == (B, K)
    # doc scores are the question embeddings . documents, with no gradient to the documents
    np.testing.assert_allclose(out.doc_scores, np.einsum("bp,bkp->bk", q, docs), rtol=1e-5)
    assert not np.any(no_grad)
    # per-document logits are BART's on that document's context (transformers' layout)
    with torch.no_grad():
        flat = models["token"](context_input_ids=_t(ctx.reshape(B * K, L)).long(),
                               context_attention_mask=_t(ctx_mask.reshape(B * K, L)).long(),
                               doc_scores=_t(np.zeros((B, K), np.float32)),
                               decoder_input_ids=_t(labels).long(), n_docs=K).logits.numpy()
    np.testing.assert_allclose(out.logits, flat.reshape(B, K, T, V), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="doc_embeddings"):
        jax.eval_shape(lambda: model.apply({"params": params}, q_ids, q_mask, docs[:, :, :8],
                                           ctx, ctx_mask, labels))
    with pytest.raises(ValueError, match="context_ids"):
        jax.eval_shape(lambda: model.apply({"params": params}, q_ids, q_mask, docs, ctx[0],
                                           ctx_mask[0], labels))


def test_sharded_loss_and_gradient_match_single_device(torch_rag):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (emulated) devices")
    _, _, cfg, params = torch_rag
    batch = _batch(seed=len("token"))
    (want_loss, _), want_grads = _compiled(cfg, "token", 0.0, params, batch)(params, batch)
    mesh = sharding.make_mesh((2, 1, 4))
    model = cfg.module()
    shardings = sharding.param_shardings(
        lambda rng: model.init(rng, **cfg.example_inputs()), jax.random.key(0), mesh=mesh)["params"]
    placed = sharding.place(params, shardings)
    q = placed["question_encoder"]["encoder"]["layers"]["layers_0"]["attention"]["query"]["kernel"]
    assert q.sharding.shard_shape(q.shape) == (32, 1, 8)             # heads over tensor
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    step = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg, kind="token", eps=0.0),
                                      has_aux=True),
                   in_shardings=(shardings, (rows,) * len(batch)))
    with sharding.activate(mesh):
        (loss, _), grads = step.lower(placed, batch).compile(FAST_COMPILE)(placed, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale),
                 grads, want_grads)
    g = grads["generator"]["decoder"]["layers"]["layers_1"]["mlp"]["wi"]["kernel"]
    assert g.sharding.shard_shape(g.shape) == (32, 12)                # as the params


# ---------------------------------------------------------------------------------------
# Hugging Face folders


def test_config_read_from_rag_folder(torch_rag):
    _, folder, cfg, params = torch_rag
    assert isinstance(cfg, RagConfig) and cfg.hf_architecture == "RagTokenForGeneration"
    assert (cfg.n_docs, cfg.max_combined_length, cfg.title_sep, cfg.doc_sep) == (K, L, " / ", " // ")
    assert (cfg.forced_bos_token_id, cfg.forced_eos_token_id) == (BOS, EOS)
    assert cfg.question_encoder.pooling == "cls" and cfg.question_encoder.encoder.num_layers == 2
    assert cfg.generator == BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=48,
        max_position_embeddings=64)
    assert set(params) == {"question_encoder", "generator"}
    assert np.any(params["generator"]["final_logits_bias"])


def test_round_trip_and_transformers_loads_export(torch_rag, tmp_path):
    models, folder, cfg, params = torch_rag
    for arch, cls in (("RagTokenForGeneration", transformers.RagTokenForGeneration),
                      ("RagSequenceForGeneration", transformers.RagSequenceForGeneration)):
        out = hf.save(tmp_path / arch, cfg.replace(hf_architecture=arch), params)
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == [arch] and config["n_docs"] == K
        generation = json.loads((out / "generation_config.json").read_text())
        assert (generation["forced_bos_token_id"], generation["forced_eos_token_id"]) == (BOS, EOS)
        cfg2, params2 = hf.load(out)
        assert cfg2 == cfg.replace(hf_architecture=arch)
        jax.tree.map(np.testing.assert_array_equal, params, params2)
        reloaded = cls.from_pretrained(out).eval()
        if arch == "RagTokenForGeneration":   # (RagSequence generates with BART's own config)
            generation = reloaded.generation_config
            assert (generation.forced_bos_token_id, generation.forced_eos_token_id) == (BOS, EOS)
        ours, theirs = reloaded.state_dict(), models["token"].state_dict()
        assert set(ours) == set(theirs)
        for name in theirs:
            np.testing.assert_array_equal(ours[name].numpy(), theirs[name].numpy(), err_msg=name)
    # the same tensors as transformers wrote
    from safetensors.numpy import load_file
    written = load_file(str(tmp_path / "RagTokenForGeneration" / "model.safetensors"))
    assert set(written) == set(load_file(str(folder / "model.safetensors")))


def test_rag_model_folder_and_scan_layout(torch_rag, tmp_path):
    """A RagModel folder has no "rag." prefix; scan_layers stacks both models' layers, and
    the folder is written back unrolled."""
    models, _, cfg, params = torch_rag
    base = transformers.RagModel(config=models["token"].config,
                                 question_encoder=models["token"].rag.question_encoder,
                                 generator=models["token"].rag.generator)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    cfg2, params2 = hf.load(tmp_path / "base")
    assert cfg2.hf_architecture == "RagModel"
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    scfg, sparams = hf.load(tmp_path / "base", scan_layers=True, n_docs=5)
    assert scfg.n_docs == 5 and scfg.generator.scan_layers
    assert scfg.question_encoder.encoder.scan_layers
    kernel = sparams["question_encoder"]["encoder"]["layers"]["layers"]["mlp"]["wi"]["kernel"]
    assert kernel.shape == (2, 32, 64)
    hf.save(tmp_path / "again", scfg, sparams)
    _, again = hf.load(tmp_path / "again")
    jax.tree.map(np.testing.assert_array_equal, params, again)
    with pytest.raises(hf.CheckpointError, match="override"):
        hf.load(tmp_path / "base", no_such_field=1)


def test_bad_rag_folders_are_refused(torch_rag, tmp_path):
    _, folder, _, _ = torch_rag
    config = json.loads((folder / "config.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    for name, change, match in (
            ("t5", {"generator": dict(config["generator"], model_type="t5")}, "only BART"),
            ("noq", {"question_encoder": None}, "question_encoder"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config | change))
        (tmp_path / name / "model.safetensors").write_bytes(weights)
        with pytest.raises(hf.CheckpointError, match=match):
            hf.load(tmp_path / name)
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    key = "rag.generator.model.decoder.layers.1.fc2.weight"
    del tensors[key]
    (tmp_path / "missing").mkdir()
    save_file(tensors, str(tmp_path / "missing" / "model.safetensors"))
    (tmp_path / "missing" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match=re.escape(key)):
        hf.load(tmp_path / "missing")


# ---------------------------------------------------------------------------------------
# Retrieval and contexts


class _Passages:
    def __init__(self, titles, texts):
        self.titles, self.texts = titles, texts

    def title(self, i):
        return self.titles[i]

    def text(self, i):
        return self.texts[i]


def test_contexts_as_transformers_retriever_builds_them(torch_rag, minilm_path):
    from transformers.models.rag.retrieval_rag import RagRetriever
    tok = hf.load_tokenizer(minilm_path)
    cfg = torch_rag[2].replace(n_docs=2, max_combined_length=24)
    passages = _Passages(['"Quoted title"', "Plain", "Third"],
                         ["some  text with  double blanks", "a short passage", "x " * 40])
    ids = np.array([[0, 1], [2, 0]])
    questions = ["who wrote it?", "what  is  this"]
    got_ids, got_mask = build_contexts(passages, ids, questions, tok, cfg)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(title_sep=" / ", doc_sep=" // ",
                                                              max_combined_length=24),
                                 generator_tokenizer=tok)
    docs = [{"title": [passages.title(i) for i in row], "text": [passages.text(i) for i in row]}
            for row in ids.tolist()]
    want_ids, want_mask = RagRetriever.postprocess_docs(fake, docs, questions, None, 2,
                                                        return_tensors="np")
    np.testing.assert_array_equal(got_ids.reshape(4, 24), want_ids)
    np.testing.assert_array_equal(got_mask.reshape(4, 24), want_mask)
    assert context_string('"T"', "a  b", "q") == "T / a b // q"
    assert got_mask[1, 0].all() and not got_mask[0, 1].all()   # long passage cut, short padded


def test_join_context_ids():
    ids, mask = join_context_ids([[[5, 6], [7]], [[8], [9, 9, 9, 9]]], [[3], [4, 4]],
                                 doc_sep_ids=[1], max_length=6, pad_id=0, bos_id=10, eos_id=11)
    np.testing.assert_array_equal(ids[0], [[10, 5, 6, 1, 3, 11], [10, 7, 1, 3, 11, 0]])
    np.testing.assert_array_equal(ids[1, 1], [10, 9, 9, 9, 9, 11])    # cut, eos kept
    np.testing.assert_array_equal(mask[0, 1], [1, 1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="same number"):
        join_context_ids([[[1]], [[1], [2]]], [[1], [1]], doc_sep_ids=[], max_length=4, pad_id=0)


def test_retrieve_from_either_backend():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(50, 16)).astype(np.float32)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    exact = retrieve(NumpySearcher(corpus), queries, corpus, 4)
    device = DeviceSearcher(corpus, block_size=8)
    on_device = retrieve(device, queries, device.embeddings, 4)
    np.testing.assert_array_equal(exact.doc_ids, on_device.doc_ids)
    np.testing.assert_array_equal(exact.doc_embeddings, corpus[exact.doc_ids])
    np.testing.assert_allclose(on_device.doc_embeddings, exact.doc_embeddings)
    np.testing.assert_allclose(exact.index_scores,
                               np.einsum("bp,bkp->bk", queries, exact.doc_embeddings), rtol=1e-5)
    # a corpus smaller than k: empty slots are id -1 with a zero embedding
    small = retrieve(NumpySearcher(corpus[:2]), queries, corpus[:2], 3)
    assert np.all(small.doc_ids[:, 2] == -1) and not np.any(small.doc_embeddings[:, 2])
    with pytest.raises(ValueError, match="rows"):
        retrieve(NumpySearcher(corpus), queries, corpus[:10], 4)


# ---------------------------------------------------------------------------------------
# A tiny fine-tuning run on real text


def _random_params(cfg, seed: int = 0, std: float = 0.02) -> dict:
    """Freshly initialized parameters (normal(std) weights, zero biases, unit LayerNorm
    scales) drawn with numpy: a jitted flax init compiles for longer than this test trains."""
    module = cfg.module()
    shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                         **cfg.example_inputs())))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "final_logits_bias"):
            return np.zeros(leaf.shape, np.float32)
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _normalize(text: str) -> str:
    """SQuAD-style answer normalization: lower case, no punctuation, no articles, single
    blanks."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def test_fine_tuning_on_wikipedia_passages(tmp_path, minilm_path, wiki_sample_path):
    """Questions whose answers (article titles) are in Wikipedia sample passages: DPR-style
    passages in a block store, MiniLM (its first two layers) as the frozen context encoder
    and as the initial question encoder, a tiny BART generator from scratch. A few dozen
    Adam steps on the RAG-Token loss lower it and raise the exact match of greedy answers.
    The vocabulary is cut down to the wordpieces this tiny corpus uses (the same MiniLM
    embeddings for them), which keeps the run to seconds on a CPU."""
    optax = pytest.importorskip("optax")
    from realm_jax.data import BlockStore, Document, SkipCounter, prepare_corpus, read_wiki_xml
    from realm_jax.decode import GenerationConfig, rag_token_generate

    docs = []
    for doc in read_wiki_xml(wiki_sample_path, SkipCounter()):
        docs.append(Document(doc.doc_id, doc.title, " ".join(doc.text.split()[:72])))
        if len(docs) == 24:
            break
    store = BlockStore.open(prepare_corpus(docs, tmp_path / "passages", tokenizer=minilm_path,
                                           mode="dpr", passage_words=24, progress=False).path)
    assert len(store) == 72
    tok = hf.load_tokenizer(minilm_path)
    n_layers, k, n_steps = 2, 2, 40
    qcfg, minilm = hf.load_embedder(minilm_path)
    assert (qcfg.pooling, qcfg.normalize) == ("mean", True)
    qcfg = dataclasses.replace(qcfg, encoder=qcfg.encoder.replace(num_layers=n_layers))
    minilm = {"encoder": {**minilm["encoder"], "layers": {
        f"layers_{i}": minilm["encoder"]["layers"][f"layers_{i}"] for i in range(n_layers)}}}

    # Questions: words of the first passage of eight articles with short titles.
    questions, answers = [], []
    for i in range(0, len(store), 3):
        title = store.title(i)
        if (len(tok(title, add_special_tokens=False)["input_ids"]) <= 3 and _normalize(title)
                and len(questions) < 8):
            questions.append(" ".join(store.text(i).split()[3:13]) + "?")
            answers.append(title)
    passages = [f"{store.title(i)}. {store.text(i)}" for i in range(len(store))]

    def ids(texts, length):
        enc = tok(texts, max_length=length, padding="max_length", truncation=True,
                  return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    # The frozen context encoder embeds every passage once (the index).
    passage_ids = ids(passages, 64)
    embed = jax.jit(lambda p, i, m: qcfg.module().apply({"params": p}, i, m))
    corpus = np.asarray(embed.lower(minilm, *passage_ids).compile(FAST_COMPILE)(
        minilm, *passage_ids))

    # The wordpieces in use, renumbered (MiniLM's rows for them; the special ids stay first).
    q_ids, q_mask = ids(questions, 16)
    labels, _ = ids(answers, 6)                                   # [CLS] title [SEP] pad
    everything = [tok(passages + questions)["input_ids"], [[0, 100, 101, 102, 103]]]
    used = np.unique(np.concatenate([np.concatenate(x) for x in everything]))
    compact = np.zeros(tok.vocab_size, np.int32)
    compact[used] = np.arange(len(used))
    pad, bos, eos = (int(compact[i]) for i in (tok.pad_token_id, tok.cls_token_id,
                                                 tok.sep_token_id))
    qcfg = dataclasses.replace(qcfg, encoder=qcfg.encoder.replace(vocab_size=len(used)))
    question_encoder = {"encoder": {**minilm["encoder"], "word_embeddings": {
        "embedding": minilm["encoder"]["word_embeddings"]["embedding"][used]}}}
    generator = BartConfig(
        vocab_size=len(used), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=pad, bos_token_id=bos,
        eos_token_id=eos, decoder_start_token_id=eos, dropout=0.0)
    cfg = RagConfig(qcfg, generator, n_docs=k, max_combined_length=64,
                    forced_bos_token_id=bos, forced_eos_token_id=eos)
    model = cfg.module()
    params = {"question_encoder": question_encoder, "generator": _random_params(generator)}

    # Retrieval with the question encoder as it starts; contexts "title / text // question".
    q_ids, labels = compact[q_ids], compact[labels]
    embed_questions = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m,
                                                          method=Rag.embed_questions))
    found = retrieve(NumpySearcher(corpus), embed_questions(params, q_ids, q_mask), corpus, k)
    assert [store.title(i) for i in found.doc_ids[:, 0]] == answers   # the index works
    ctx, ctx_mask = build_contexts(store, found.doc_ids, questions, tok, cfg)
    ctx = compact[ctx]
    decoder_inputs = np.asarray(shift_tokens_right(labels, pad, eos))
    batch = (q_ids, q_mask, found.doc_embeddings, ctx, ctx_mask, decoder_inputs, labels)

    def loss_fn(params, batch):
        q_ids, q_mask, docs, ctx, ctx_mask, dec, labels = batch
        out = model.apply({"params": params}, q_ids, q_mask, docs, ctx, ctx_mask, dec)
        return rag_token_nll(out.logits, labels, out.doc_scores, pad_id=pad) / len(labels)

    tx = optax.multi_transform({"q": optax.adam(1e-4), "g": optax.adam(1e-2)},
                               {"question_encoder": "q", "generator": "g"})

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    gen = GenerationConfig.from_rag(cfg, num_beams=1, max_length=8)
    decode = rag_token_generate.lower(params, ctx, ctx_mask, found.index_scores, config=cfg,
                                      gen=gen).compile(FAST_COMPILE)

    def exact_match(params):
        scores = np.einsum("bp,bkp->bk", embed_questions(params, q_ids, q_mask),
                           found.doc_embeddings)             # the live question encoder's
        out = decode(params, ctx, ctx_mask, scores.astype(np.float32))
        texts = tok.batch_decode(used[np.asarray(out.sequences[:, 0])], skip_special_tokens=True)
        return np.mean([_normalize(t) == _normalize(a) for t, a in zip(texts, answers)])

    before = exact_match(params)
    opt_state = tx.init(params)
    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, opt_state, batch).compile(FAST_COMPILE)
    losses = []
    for i in range(n_steps):
        params, opt_state, loss, grads = step(params, opt_state, batch)
        losses.append(float(loss))
        if i == 0:      # the loss reaches the question encoder, through all its layers
            q_grads = grads["question_encoder"]["encoder"]
            assert np.abs(q_grads["word_embeddings"]["embedding"]).max() > 0
            assert np.abs(q_grads["layers"]["layers_0"]["mlp"]["wi"]["kernel"]).max() > 0
    after = exact_match(params)
    assert np.mean(losses[-5:]) < 0.25 * losses[0]
    assert before == 0.0 and after >= 0.5, (before, after, losses[::5])
