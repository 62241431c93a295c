"""ICT and DPR on the one Trainer, with tiny towers on the Wikipedia sample: `realm-jax
train` and an exact resume, the gradient cache through the Trainer's step, the same loss on
8 devices as on one, `realm-jax eval` (recall@k into W/eval/metrics.json), `realm-jax
convert` of a tower to an HF folder that embeds as the run does, `realm-jax mine`, and an
ICT run's towers accepted by ORQA and REALM.

The runs of a task compile the same step; a persistent compilation cache compiles it once."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from realm_jax import cli, sharding, tasks
from realm_jax import config as config_lib
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.data.corpus import prepare_corpus
from realm_jax.data.store import BlockStore
from realm_jax.train.state import TrainState
from realm_jax.train.trainer import train_step

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"ict": str(REPO / "configs/ict.py") + ":tiny",
           "dpr": str(REPO / "configs/dpr.py") + ":tiny"}

pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def documents(tmp_path_factory, wiki_sample_path, minilm_path):
    """Ten short documents of Wikipedia text (three blocks of the sample each), so that a
    store of them has fewer than 100 blocks."""
    root = tmp_path_factory.mktemp("wiki")
    prepare_corpus(wiki_sample_path, root / "store", tokenizer=minilm_path, mode="realm",
                   max_tokens=32, max_documents=3, progress=False)
    store = BlockStore.open(root / "store")
    with open(root / "docs.jsonl", "w") as f:
        for d in range(10):
            text = " ".join(store.text(i) for i in range(3 * d, 3 * d + 3))
            f.write(json.dumps({"id": f"doc{d}", "title": f"{store.title(3 * d)} {d}",
                                "text": text}) + "\n")
    return str(root / "docs.jsonl")


@pytest.fixture(scope="module")
def realm_store(tmp_path_factory, documents, minilm_path):
    out = tmp_path_factory.mktemp("ict") / "store"
    prepare_corpus(documents, out, tokenizer=minilm_path, mode="realm", max_tokens=32,
                   progress=False)
    return str(out)


@pytest.fixture(scope="module")
def dpr_data(tmp_path_factory, documents, minilm_path):
    """A DPR passage store and questions made from it: a question is words 2-9 of a
    passage, its positive that passage (passage_id = its document id), its answer the
    passage's last word, its hard negative the next passage."""
    root = tmp_path_factory.mktemp("dpr")
    prepare_corpus(documents, root / "store", tokenizer=minilm_path, mode="dpr",
                   passage_words=30, progress=False)
    store = BlockStore.open(root / "store")

    def ctx(i):
        return {"title": store.title(i), "text": store.text(i), "passage_id": store.doc_id(i)}

    records = [{"question": " ".join(store.text(i).split()[2:10]),
                "answers": [store.text(i).split()[-1].strip(".,;")],
                "positive_ctxs": [ctx(i)], "negative_ctxs": [],
                "hard_negative_ctxs": [ctx((i + 1) % len(store))]}
               for i in range(min(len(store), 24))]
    (root / "train.json").write_text(json.dumps(records))
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:12]))
    return {"corpus": str(root / "store"), "train": str(root / "train.json"),
            "eval": str(root / "dev.jsonl"), "store": store}


def _overrides(task, realm_store, dpr_data, minilm_path):
    if task == "ict":
        return [f"data.corpus={realm_store}", f"data.tokenizer={minilm_path}"]
    return [f"data.corpus={dpr_data['corpus']}", f"data.tokenizer={minilm_path}",
            f"data.train={dpr_data['train']}", f"data.eval={dpr_data['eval']}"]


def _train(workdir, task, overrides, *extra):
    argv = ["train", "--config", CONFIGS[task], "--workdir", str(workdir), *extra,
            *(f"--config.{o}" for o in overrides)]
    assert cli.main(argv) == 0


def _params(workdir, step):
    ckpts = TrainCheckpoints(workdir)
    return {p: ckpts.restore_part(step, p) for p in ("query_tower", "doc_tower")}


@pytest.fixture(scope="module", params=["ict", "dpr"])
def runs(request, tmp_path_factory, realm_store, dpr_data, minilm_path):
    """A task trained 4 steps straight, and 2 steps then resumed to 4."""
    task = request.param
    root = tmp_path_factory.mktemp(f"run_{task}")
    overrides = _overrides(task, realm_store, dpr_data, minilm_path)
    _train(root / "straight", task, overrides)
    _train(root / "resumed", task, overrides, "--stop_after", "2")
    assert TrainCheckpoints(root / "resumed").latest_step() == 2
    _train(root / "resumed", task, overrides)
    return task, root, overrides


def test_trains_and_resumes_exactly(runs):
    task, root, _ = runs
    straight, resumed = _params(root / "straight", 4), _params(root / "resumed", 4)
    first = _params(root / "straight", 0)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                         straight, first))
    assert max(moved) > 0          # the towers trained
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    rows = [json.loads(line) for line in
            (root / "straight" / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "loss" in r} >= {1, 4}


def test_eval_writes_recall(runs, dpr_data, realm_store):
    task, root, _ = runs
    assert cli.main(["eval", "--workdir", str(root / "straight")]) == 0
    metrics = json.loads((root / "straight" / "eval" / "metrics.json").read_text())
    store = BlockStore.open(realm_store if task == "ict" else dpr_data["corpus"])
    assert metrics["task"] == task and metrics["step"] == 4 and "hit" in metrics
    assert metrics["corpus_blocks"] == len(store) < 100
    recalls = [metrics[f"recall@{k}"] for k in (1, 5, 20, 100)]
    assert recalls == sorted(recalls)
    # Every block is among the top 100: each question's positive (or own block) is found.
    assert recalls[-1] == 1.0
    rows = [json.loads(line) for line in
            (root / "straight" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["count"] > 0
    assert metrics["recall@1"] == pytest.approx(np.mean([r["hit_rank"] == 0 for r in rows]))
    assert cli.main(["answer", "--workdir", str(root / "straight"), "Who was an anarchist?"]) == 0
    if task == "dpr":
        assert metrics["count"] == 12
    else:  # the held-out document's blocks, their own block the hit
        assert all(r["block_id"] in r["retrieved"][:10] or r["hit_rank"] >= 10 for r in rows)


def test_convert_tower_embeds_as_the_run(runs, tmp_path, minilm_path):
    from realm_jax.embedding import TextEmbedder
    from realm_jax.tasks.retriever import load_towers

    task, root, _ = runs
    out = tmp_path / "q"
    assert cli.main(["convert", "--workdir", str(root / "straight"), "--part", "query_tower",
                     "--out", str(out)]) == 0
    loaded = TextEmbedder.from_hf(out)
    texts = ["Anarchism is a political philosophy.", "The river flows north in winter."]
    configs, params, _ = load_towers(root / "straight")
    enc = loaded.tokenizer(texts, padding="max_length", max_length=24, return_tensors="np")
    want = configs["query_tower"].module().apply({"params": params["query_tower"]},
                                                 enc["input_ids"], enc["attention_mask"])
    np.testing.assert_allclose(loaded.embed(texts), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert loaded.config == configs["query_tower"]


def test_mine_writes_negatives(runs, tmp_path, dpr_data):
    from realm_jax.data.dpr import read_dpr
    from realm_jax.evaluate import has_answer
    from realm_jax.index.mining import is_positive

    task, root, _ = runs
    if task != "dpr":
        pytest.skip("mining is for DPR data")
    store = dpr_data["store"]
    for extra in ([], ["--bm25"]):
        out = tmp_path / f"mined{len(extra)}.json"
        assert cli.main(["mine", "--workdir", str(root / "straight"), "--input",
                         dpr_data["train"], "--output", str(out), "--num_negatives", "2",
                         *extra]) == 0
        mined = read_dpr(out)
        assert len(mined) == len(read_dpr(dpr_data["train"]))
        assert sum(len(r.hard_negative_ctxs) for r in mined) > 0
        for r in mined:
            assert len(r.hard_negative_ctxs) <= 2
            for p in r.hard_negative_ctxs:
                assert store.text(p.block_id) == p.text
                assert not is_positive(store, p.block_id, r)
                assert not has_answer(p.text, r.answers)


def test_orqa_and_realm_accept_ict_towers(runs, tmp_path, realm_store, minilm_path):
    from realm_jax.tasks import orqa, realm

    task, root, _ = runs
    if task != "ict":
        pytest.skip("one task suffices")
    run = str(root / "straight")
    saved = _params(run, 4)
    c = config_lib.load_config("orqa:tiny", f"model.init_from_realm={run}",
                               f"data.corpus={realm_store}", f"data.tokenizer={minilm_path}",
                               "model.encoder.vocab_size=30522")
    configs, params = orqa.build_models(c)
    jax.tree.map(np.testing.assert_array_equal, params["query_tower"], saved["query_tower"])
    assert set(params) == {"query_tower", "reader"}
    for part in ("query_tower", "doc_tower"):
        assert cli.main(["convert", "--workdir", run, "--part", part,
                         "--out", str(tmp_path / part)]) == 0
    c = config_lib.load_config("realm:tiny", f"model.query_tower_hf={tmp_path / 'query_tower'}",
                               f"model.doc_tower_hf={tmp_path / 'doc_tower'}",
                               "model.encoder.vocab_size=30522")
    configs, params = realm.build_models(c)
    for part in ("query_tower", "doc_tower"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0),
                     params[part], saved[part])


# ---------------------------------------------------------------------------------------
# The step: gradient cache and sharding

@pytest.fixture(scope="module")
def dpr_batch(dpr_data, minilm_path):
    config = config_lib.load_config(CONFIGS["dpr"], *(
        _overrides("dpr", None, dpr_data, minilm_path)), "train.grad_cache_chunk_size=4")
    task = tasks.get("dpr")(config)
    configs, params = task.build()
    item = task.load(next(iter(task.dataset(None))))
    return config, task, params, item


def test_grad_cache_step_equals_plain(dpr_batch):
    config, task, params, item = dpr_batch
    assert task.value_and_grad is not None
    mesh = sharding.mesh_from_config(config)
    # An "optimizer" that keeps the step's gradients as its state and changes nothing.
    zeros = lambda tree: jax.tree.map(jax.numpy.zeros_like, tree)  # noqa: E731
    optimizer = optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))
    with sharding.activate(mesh, sharding.rules_from_config(config)):
        batch = sharding.global_batch(item, sharding.batch_sharding(mesh))
        state = TrainState(jax.numpy.zeros((), jax.numpy.int32), params, optimizer.init(params))
        rng = jax.random.key(0)
        plain, m_plain = jax.jit(train_step(task.loss, optimizer))(state, batch, None, rng)
        cached, m_cached = jax.jit(train_step(task.loss, optimizer, task.value_and_grad))(
            state, batch, None, rng)
    assert float(m_plain["loss"]) > 0
    np.testing.assert_allclose(float(m_cached["loss"]), float(m_plain["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_cached["grad_norm"]), float(m_plain["grad_norm"]),
                               rtol=1e-4)

    # Equal up to float32 rounding (the embeddings are summed in another order; the same
    # comparison with float64 towers agrees to about 1e-10): against the largest entry.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain.opt_state))
    diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                        cached.opt_state, plain.opt_state))
    assert scale > 0 and max(diff) <= 2e-3 * scale, (max(diff), scale)


def test_sharded_loss_equals_one_device(dpr_batch):
    config, task, params, item = dpr_batch
    assert jax.device_count() == 8
    mesh = sharding.mesh_from_config(config)
    with sharding.activate(mesh, sharding.rules_from_config(config)):
        batch = sharding.global_batch(item, sharding.batch_sharding(mesh))
        assert len(batch["query_ids"].sharding.device_set) == 8
        sharded, _ = jax.jit(task.loss)(params, batch, None, None)
    one = jax.devices()[0]
    single, metrics = jax.jit(task.loss)(jax.device_put(params, one),
                                         jax.device_put(item, one), None, None)
    np.testing.assert_allclose(float(sharded), float(single), rtol=1e-5)
    # By hand: -log softmax of each question's positive among all 16 passages.
    q = task.loss_fn.embed("query_tower", params, item["query_ids"], item["query_mask"])
    d = task.loss_fn.embed("doc_tower", params, item["doc_ids"], item["doc_mask"])
    logits = np.asarray(q) @ np.asarray(d).T
    logits = np.where(item["doc_valid"][None], logits, -np.inf)
    pos = np.arange(len(q)) * 2
    nll = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1) \
        - logits[np.arange(len(q)), pos]
    np.testing.assert_allclose(float(single), nll.mean(), rtol=1e-5)


def test_shared_towers_are_one_part(dpr_batch):
    config, _, _, item = dpr_batch
    config = config_lib.load_config(CONFIGS["dpr"], f"data.tokenizer={config.data.tokenizer}",
                                    "model.shared_towers=true")
    task = tasks.get("dpr")(config)
    configs, params = task.build()
    assert set(configs) == {"doc_tower"}
    loss, _ = jax.jit(task.loss)(params, item, None, None)
    embed = lambda ids, mask: np.asarray(  # noqa: E731
        configs["doc_tower"].module().apply({"params": params["doc_tower"]}, ids, mask))
    q, d = embed(item["query_ids"], item["query_mask"]), embed(item["doc_ids"], item["doc_mask"])
    logits = np.where(item["doc_valid"][None], q @ d.T, -np.inf)
    want = np.mean([np.logaddexp.reduce(row) - row[2 * i] for i, row in enumerate(logits)])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_empty_negative_slots_keep_gradients_finite(dpr_batch):
    """A question short of negatives has an empty, all-masked passage slot: left out of the
    loss, and given one unmasked token so that a normalised tower's gradient stays finite."""
    import dataclasses

    from realm_jax.tasks.retriever import TowerLoss

    _, task, params, item = dpr_batch
    raw = {"question_input_ids": item["query_ids"], "question_attention_mask": item["query_mask"],
           "passage_input_ids": item["doc_ids"].copy(),
           "passage_attention_mask": item["doc_mask"].copy(),
           "passage_valid": item["doc_valid"].copy()}
    raw["passage_valid"][1] = False
    raw["passage_input_ids"][1] = raw["passage_attention_mask"][1] = 0
    cfg = dataclasses.replace(task.loss_fn.configs["query_tower"], pooling="mean", normalize=True)
    loss_fn = TowerLoss({"query_tower": cfg, "doc_tower": cfg}, "dpr")
    unfixed = dict(task.rows(raw), doc_mask=raw["passage_attention_mask"])
    for rows, finite in ((unfixed, False), (task.rows(raw), True)):
        grads = jax.grad(lambda p: loss_fn(p, rows, None, None)[0])(params)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)) == finite


def test_mean_pooled_normalised_tower_keeps_its_pooling_in_hf(tmp_path, minilm_path):
    """A tower started from all-MiniLM-L6-v2 (mean pooling, normalised) is written as a BERT
    folder with sentence-transformers' pooling files, and reads back the same."""
    from realm_jax import hf
    from realm_jax.models import EmbedderConfig, EncoderConfig, random_params

    enc = EncoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=32, max_position_embeddings=32, add_pooler=False)
    cfg = EmbedderConfig(enc, pooling="mean", normalize=True)
    params = random_params(cfg, 0)
    hf.save_embedder(tmp_path / "t", cfg, params)
    assert hf.sentence_transformers_pooling(tmp_path / "t") == ("mean", True)
    loaded, loaded_params = hf.load_embedder(tmp_path / "t")
    assert loaded == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
    assert hf.embedder_files(EmbedderConfig(enc, pooling="cls")) == {}
    with pytest.raises(hf.CheckpointError, match="no Hugging Face layout"):
        hf.embedder_files(EmbedderConfig(enc, pooling="cls", normalize=True))
