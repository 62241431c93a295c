"""RAG fine-tuning as commands, on real text: Wikipedia sample passages in a block store, the
first two layers of MiniLM as question and (frozen) context encoder, a tiny BART from
scratch; the index built by `realm-jax refresh --once`, `realm-jax train` with RAG-Token and
RAG-Sequence on 8 emulated devices (data x fsdp x tensor = 2 x 2 x 2), the loss falling and
the exact match of generated answers rising, a stopped run resumed to the same parameters,
`realm-jax eval` and `realm-jax answer` on the workdir.

The runs compile the same steps; a persistent compilation cache compiles each once."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from realm_jax import cli, hf, models
from realm_jax import config as config_lib
from realm_jax.tasks import rag
from realm_jax.train import trainer
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.train.metrics import read_metrics

STEPS = 40


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


@pytest.fixture(autouse=True)
def keep_logging():
    """cli.main points logging at the (captured) stderr of its test: undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _small_minilm(minilm_path: str, out: Path, texts, num_layers: int = 2) -> str:
    """MiniLM's first layers as a sentence-transformers folder (mean pooling, normalized),
    its vocabulary cut down to the wordpieces of `texts` and the special tokens, renumbered
    in order (WordPiece then splits those texts exactly as before; far fewer embeddings
    keep the runs to seconds on a CPU)."""
    src = Path(minilm_path)
    tok = hf.load_tokenizer(src)
    used = sorted(set(np.concatenate(tok(list(texts))["input_ids"]).tolist())
                  | set(tok.all_special_ids))
    cfg, params = hf.load(src)
    layers = params["layers"]
    params = dict(params, layers={f"layers_{i}": layers[f"layers_{i}"] for i in range(num_layers)},
                  word_embeddings={"embedding": params["word_embeddings"]["embedding"][used]})
    hf.save(out, cfg.replace(num_layers=num_layers, vocab_size=len(used)), params)
    spec = json.loads((src / "tokenizer.json").read_text())
    pieces = {i: piece for piece, i in spec["model"]["vocab"].items()}
    vocab = {pieces[i]: n for n, i in enumerate(used)}
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    for special in spec["post_processor"]["special_tokens"].values():
        special["ids"] = [vocab[t] for t in special["tokens"]]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "vocab.txt").write_text("".join(pieces[i] + "\n" for i in used))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "modules.json"):
        shutil.copy(src / name, out / name)
    shutil.copytree(src / "1_Pooling", out / "1_Pooling")
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory, minilm_path, wiki_sample_path):
    """Passages, an encoder folder, questions whose answers are article titles (words of
    a passage of the article), and the index the refresher builds from the encoder."""
    from realm_jax.data import BlockStore, Document, SkipCounter, prepare_corpus, read_wiki_xml
    from realm_jax.evaluate import normalize_answer

    root = tmp_path_factory.mktemp("rag")
    docs = []
    for doc in read_wiki_xml(wiki_sample_path, SkipCounter()):
        docs.append(Document(doc.doc_id, doc.title, " ".join(doc.text.split()[:72])))
        if len(docs) == 24:
            break
    encoder = _small_minilm(minilm_path, root / "encoder",
                            [d.title for d in docs] + [d.text for d in docs] + ["?"])
    store = BlockStore.open(prepare_corpus(docs, root / "passages", tokenizer=encoder,
                                           mode="dpr", passage_words=24, progress=False).path)
    tok = hf.load_tokenizer(encoder)
    qa = []
    for i in range(0, len(store), 3):
        title = store.title(i)
        if len(tok(title, add_special_tokens=False)["input_ids"]) <= 3 and normalize_answer(title):
            qa.append({"id": f"q{i}", "question": " ".join(store.text(i).split()[3:13]) + "?",
                       "answers": [title]})
        if len(qa) == 8:
            break
    qa_file = root / "qa.jsonl"
    qa_file.write_text("".join(json.dumps(r) + "\n" for r in qa))
    overrides = _overrides(store.path, qa_file, encoder)
    index_home = root / "index_home"
    assert cli.main(["refresh", "--config", "configs/rag.py:tiny", "--workdir", str(index_home),
                     "--once", "--no_progress", *overrides]) == 0
    return {"root": root, "encoder": encoder, "store": store, "qa": qa, "overrides": overrides,
            "index": index_home / "index"}


def _overrides(corpus, qa_file, encoder, *more):
    return [f"--config.{o}" for o in (
        f"data.corpus={corpus}", f"data.train={qa_file}", f"data.eval={qa_file}",
        f"model.question_encoder_hf={encoder}", f"model.context_encoder_hf={encoder}",
        f"data.generator_tokenizer={encoder}", "rag.n_docs=2", "rag.max_source_length=16",
        "rag.max_target_length=6", "rag.max_combined_length=64",
        "model.generator.encoder_layers=1", "model.generator.decoder_layers=1",
        "model.generator.d_model=64", "model.generator.encoder_ffn_dim=128",
        "model.generator.decoder_ffn_dim=128", "model.generator.max_position_embeddings=128",
        "mesh.shape=(2,2,2)",
        f"train.steps={STEPS}", "train.batch_size=8", "train.learning_rate=0.01",
        "train.question_encoder_lr_multiplier=0.01", "train.decay=constant",
        f"train.checkpoint_every={STEPS}", "train.log_every=5", "eval.batch_size=8",
        "eval.recall_at=(1,2)", *more)]


def _config(data, arg="", *more):
    argv = ["--config", "configs/rag.py:tiny" + (f",{arg}" if arg else "")]
    config, rest = config_lib.parse_config_flags(argv + data["overrides"] + list(more))
    assert not rest
    return config


def _workdir(data, name) -> Path:
    workdir = data["root"] / name
    shutil.copytree(data["index"], workdir / "index")
    return workdir


def _train_rows(workdir):
    return [r for r in read_metrics(workdir) if "loss" in r]


def _fine_tune(data, kind: str, capsys) -> tuple[Path, dict, dict, list[dict]]:
    """A run initialized (step 0) and evaluated (`RagAnswerer.evaluate`), trained by `realm-jax
    train`, evaluated by `realm-jax eval` (with the config the run saved): (workdir, summary
    before, summary after, logged train rows)."""
    from realm_jax import evaluate

    spec = "configs/rag.py:tiny" + (",sequence" if kind == "sequence" else "")
    config = _config(data, "sequence" if kind == "sequence" else "")
    workdir = _workdir(data, f"run_{kind}")
    trainer.train(config, workdir, stop_after=0)
    before, _ = rag.RagAnswerer(config, workdir).evaluate()
    assert cli.main(["train", "--config", spec, "--workdir", str(workdir),
                     *data["overrides"]]) == 0
    assert TrainCheckpoints(workdir).latest_step() == STEPS
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    table, path = capsys.readouterr().out.rsplit("predictions: ", 1)
    predictions = evaluate.read_predictions(path.strip())
    after = evaluate.summarize(predictions, config.eval.recall_at)
    assert f"| {100 * after['exact_match']:.1f} |" in table
    assert [p.qid for p in predictions] == [q["id"] for q in data["qa"]]
    rows = _train_rows(workdir)
    with capsys.disabled():
        print(f"\nRAG-{kind}: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, exact "
              f"match {before['exact_match']:.3f} -> {after['exact_match']:.3f}, recall@1 "
              f"{before['recall@1']:.3f} -> {after['recall@1']:.3f}")
    return workdir, before, after, rows


def _check_fine_tuning(data, before, after, rows):
    assert before["step"] == 0 and before["count"] == after["count"] == len(data["qa"])
    assert [r["step"] for r in rows] == [1] + list(range(5, STEPS + 1, 5))
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"], [r["loss"] for r in rows]
    assert all(0.5 <= r["top_doc_prob"] <= 1 and r["answer_in_docs"] >= 0.75 for r in rows)
    assert before["exact_match"] == 0.0 and after["exact_match"] >= 0.75, (before, after)
    assert after["recall@2"] >= 0.75


def test_rag_token_fine_tuning_and_the_workdir_commands(data, capsys):
    """RAG-Token: `realm-jax train` lowers the loss and raises the exact match; `realm-jax
    answer` answers from the workdir, and `realm-jax refresh --once` finds the frozen index
    current (the trainer's checkpoints hold no document tower)."""
    workdir, before, after, rows = _fine_tune(data, "token", capsys)
    _check_fine_tuning(data, before, after, rows)
    assert TrainCheckpoints(workdir).is_finished()
    question = data["qa"][0]
    assert cli.main(["answer", "--workdir", str(workdir), question["question"]]) == 0
    out = capsys.readouterr().out
    assert f"Q: {question['question']}" in out and "1. [" in out
    assert cli.main(["refresh", "--config", "configs/rag.py:tiny", "--workdir", str(workdir),
                     "--once", *data["overrides"]]) == 0
    assert len(list((workdir / "index").glob("v*"))) == 1
    _check_search_uses_the_trained_question_encoder(workdir, data, capsys)


def _check_search_uses_the_trained_question_encoder(workdir, data, capsys):
    """`realm-jax search` on a RAG workdir embeds questions with the question encoder of the
    newest checkpoint (trained against the frozen index), not the pretrained HF folder."""
    from realm_jax.search import Searcher

    searcher = Searcher(workdir)
    trained = TrainCheckpoints(workdir).restore_part(STEPS, "question_encoder")
    _, pretrained = hf.load_embedder(data["encoder"])
    used = jax.device_get(searcher.embedder.params)
    jax.tree.map(np.testing.assert_array_equal, used, trained)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), used, pretrained))
    assert max(moved) > 1e-4
    questions = [q["question"] for q in data["qa"]]
    got = searcher.embedder.embed(questions[:1])
    # the command answers from the same embeddings: the best block by hand
    capsys.readouterr()
    assert cli.main(["search", "--workdir", str(workdir), "--top_k", "1", "--json",
                     questions[0]]) == 0
    [line] = capsys.readouterr().out.splitlines()
    _, [best] = searcher.searcher.search(got[:1], 1)
    assert json.loads(line)["results"][0]["id"] == searcher.store.doc_id(int(best[0]))


def test_rag_sequence_fine_tuning(data, capsys):
    """RAG-Sequence (loss and thorough decoding) the same way."""
    _, before, after, rows = _fine_tune(data, "sequence", capsys)
    _check_fine_tuning(data, before, after, rows)


def test_a_stopped_run_resumes_to_the_same_parameters(data):
    """Stopped at step 3 (checkpoints 0 and 3) and resumed to 6, a run ends with the
    parameters and losses of an uninterrupted one: the input position, the optimizer state
    and the live retrieval all continue."""
    config = _config(data, "", "--config.train.steps=6", "--config.train.checkpoint_every=3",
                     "--config.train.log_every=1")
    stopped, straight = _workdir(data, "resume_a"), _workdir(data, "resume_b")
    trainer.train(config, stopped, stop_after=3)
    checkpoints = TrainCheckpoints(stopped)
    assert checkpoints.all_steps() == [0, 3] and not checkpoints.is_finished()
    resumed = trainer.train(config, stopped)
    run = trainer.Trainer(config, straight)
    # A hook added to the trainer runs at the start, every `every` steps and at the end.
    seen = []
    run.add_hook(lambda step, params: seen.append(step) or {"probe": float(step)}, name="probe",
                 every=4)
    reference = run.run()
    assert seen == [0, 4, 6] and reference["last_probe"] == {"probe": 6.0, "step": 6}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["final_state"].params),
                 jax.device_get(reference["final_state"].params))
    losses = lambda w: {r["step"]: r["loss"] for r in _train_rows(w)}  # noqa: E731
    assert losses(stopped) == losses(straight) and sorted(losses(stopped)) == list(range(1, 7))


def test_bad_settings_are_named(data, tmp_path):
    for override, message in (("rag.loss=marginal", "rag.loss='marginal'"),
                              ("data.train=", "set --config.data.train"),
                              ("retrieval.backend=faiss", "retrieval.backend='faiss'")):
        with pytest.raises(ValueError, match=message):
            trainer.train(_config(data, "", f"--config.{override}"), tmp_path / "w")


def test_both_parts_from_a_rag_folder(data, tmp_path):
    """A Hugging Face RAG folder (question encoder + BART, tokenizers in its subfolders)
    gives both parts, its own generation ids, and the run's n_docs and loss."""
    from realm_jax.models import BartConfig, EmbedderConfig, EncoderConfig, RagConfig

    tok = hf.load_tokenizer(data["encoder"])
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
               eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.sep_token_id)
    saved = RagConfig(
        EmbedderConfig(EncoderConfig(len(tok), 16, 1, 2, 32, add_pooler=False)),
        BartConfig(len(tok), 16, 1, 1, 2, 2, 32, 32, **ids), forced_eos_token_id=ids["eos_token_id"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32),
                          models.abstract_params(saved))
    folder = hf.save(tmp_path / "rag", saved, params, architecture="RagSequenceForGeneration")
    for sub in ("question_encoder_tokenizer", "generator_tokenizer"):
        tok.save_pretrained(folder / sub)
    config = _config(data, "sequence", f"--config.model.question_encoder_hf={folder}",
                     f"--config.model.generator_hf={folder}", "--config.data.generator_tokenizer=")
    cfg, loaded = rag.build_model(config, rag.load_tokenizers(config))
    assert cfg == saved.replace(n_docs=2, max_combined_length=64,
                                hf_architecture="RagSequenceForGeneration")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
