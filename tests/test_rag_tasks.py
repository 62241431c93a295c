"""RAG's tasks beyond short answers, end to end on data made from the Wikipedia sample
(benchmarks/rag_tasks.py): Jeopardy question generation (RAG-Token), MS MARCO answers
(RAG-Sequence, fast decoding) and FEVER (RAG-Sequence, labels generated and scored as
classes), each from its own config's `:tiny` variant with `data.format` set: a run stopped
and resumed, then `realm-jax eval` writing WORKDIR/eval/metrics.json with the task's
metrics, the same figures `realm-jax score` gives for the predictions. And the scoring of
answers (tasks/common.py) on hand-made answers."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from realm_jax import cli, evaluate, hf
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.data.tasks import fever_labels, read_task
from realm_jax.tasks import common, rag
from realm_jax.tasks.base import Answer, Passage
from realm_jax.train.metrics import read_metrics
from realm_jax.workdir import Workdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import rag_tasks  # noqa: E402  (benchmarks/rag_tasks.py: the data makers)
from test_train_rag import _small_minilm  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py

STEPS, STOP = 4, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path, wiki_sample_path):
    """Passages of the first 16 articles, an encoder (MiniLM's first layer), the frozen index,
    and each task's train/eval files."""
    from realm_jax.data import BlockStore, Document, SkipCounter, prepare_corpus, read_wiki_xml

    root = tmp_path_factory.mktemp("rag_tasks")
    docs = []
    for doc in read_wiki_xml(wiki_sample_path, SkipCounter()):
        docs.append(Document(doc.doc_id, doc.title, " ".join(doc.text.split()[:48])))
        if len(docs) == 16:
            break
    texts = [d.title for d in docs] + [d.text for d in docs] + ["? what is this"]
    encoder = _small_minilm(minilm_path, root / "encoder", texts, num_layers=1)
    store = BlockStore.open(prepare_corpus(docs, root / "passages", tokenizer=encoder,
                                           mode="dpr", passage_words=24, progress=False).path)
    passages = [(store.title(i), store.text(i)) for i in range(len(store))]
    files = {task: rag_tasks.write_jsonl(root / f"{task}.jsonl", make(passages)[:8])
             for task, make in rag_tasks.RECORDS.items()}
    common_overrides = [f"--config.{o}" for o in (
        f"data.corpus={store.path}", f"model.question_encoder_hf={encoder}",
        f"model.context_encoder_hf={encoder}", f"data.generator_tokenizer={encoder}",
        "rag.n_docs=2", "rag.max_source_length=16", "rag.max_target_length=8",
        "rag.max_combined_length=48", "model.generator.encoder_layers=1",
        "model.generator.decoder_layers=1", "model.generator.d_model=32",
        "model.generator.encoder_ffn_dim=64", "model.generator.decoder_ffn_dim=64",
        "model.generator.max_position_embeddings=64", "retrieval.backend=exact",
        f"train.steps={STEPS}", f"train.checkpoint_every={STOP}", "train.log_every=1",
        "eval.batch_size=8", "eval.recall_at=(1,2)",
        "train.fast_compile=True")]
    index_home = root / "index_home"
    assert cli.main(["refresh", "--config", "configs/rag.py:tiny", "--workdir", str(index_home),
                     "--once", "--no_progress", *common_overrides]) == 0
    return {"root": root, "store": store, "files": files, "overrides": common_overrides,
            "index": index_home / "index"}


def _run(setup, task: str, capsys) -> tuple[Path, dict]:
    """`realm-jax train` stopped at STOP and resumed to STEPS, then `realm-jax eval`: (the
    workdir, metrics.json)."""
    spec = rag_tasks.CONFIGS[task]
    data = setup["files"][task]
    workdir = setup["root"] / f"run_{task}"
    shutil.copytree(setup["index"], workdir / "index")
    argv = ["train", "--config", spec, "--workdir", str(workdir), *setup["overrides"],
            f"--config.data.train={data}", f"--config.data.eval={data}"]
    assert cli.main(argv + ["--stop_after", str(STOP)]) == 0
    assert not TrainCheckpoints(workdir).is_finished()
    assert cli.main(argv) == 0
    checkpoints = TrainCheckpoints(workdir)
    assert checkpoints.is_finished() and checkpoints.latest_step() == STEPS
    assert sorted(r["step"] for r in read_metrics(workdir) if "loss" in r) == list(
        range(1, STEPS + 1))
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    path = workdir / "eval" / "metrics.json"
    assert f"metrics: {path}" in out
    return workdir, json.loads(path.read_text())


@pytest.mark.parametrize("task", ["jeopardy", "msmarco"])
def test_generation_tasks_train_resume_and_write_their_metrics(setup, task, capsys):
    """Jeopardy (RAG-Token) and MS MARCO (RAG-Sequence, fast decoding):
    metrics.json holds the config's metrics, equal to `realm-jax score` of the predictions."""
    workdir, metrics = _run(setup, task, capsys)
    config = Workdir(workdir).read_config()
    names = list(config.eval.metrics)
    assert names == {"jeopardy": ["qbleu1", "bleu1", "distinct3"],
                     "msmarco": ["bleu1", "rougeL"]}[task]
    predictions = workdir / "eval" / "predictions.jsonl"
    scored = evaluate.score_file(predictions, names)
    assert {k: metrics[k] for k in scored} == scored and metrics["step"] == STEPS
    assert metrics["count"] == len(read_task(setup["files"][task], task)) == 8
    assert "rprec" not in metrics   # no provenance in these files
    if task == "jeopardy":   # RAG-Token sampling (eval.do_sample): seeded, so repeatable
        def sample(seed, name):
            assert cli.main(["eval", "--workdir", str(workdir), "--config.eval.do_sample=True",
                             "--config.eval.top_k=5", f"--config.eval.seed={seed}",
                             "--out", str(workdir / name)]) == 0
            return [p.answer for p in evaluate.read_predictions(workdir / name)]

        assert sample(1, "a.jsonl") == sample(1, "b.jsonl")


def test_fever_is_scored_as_classification_with_provenance(setup, capsys):
    """FEVER (2-way, RAG-Sequence): the generations mapped to labels, label accuracy, and
    KILT R-precision / recall@k of the retrieved pages against the claims' evidence pages."""
    workdir, metrics = _run(setup, "fever", capsys)
    examples = read_task(setup["files"]["fever"], "fever2")
    rows = evaluate.read_predictions(workdir / "eval" / "predictions.jsonl")
    labels = fever_labels(2)
    hits = [labels.label_of(p.answer) == ex.label for p, ex in zip(rows, examples)]
    assert metrics["accuracy"] == pytest.approx(np.mean(hits))
    assert metrics["provenance_count"] == len(examples) == 8
    titles = [[q.title for q in p.passages] for p in rows]
    # One evidence page per claim: R-precision is whether the top passage is from it.
    assert metrics["rprec"] == pytest.approx(np.mean(
        [t[0] == ex.provenance[0][0] for t, ex in zip(titles, examples)]))
    assert metrics["recall@5"] == pytest.approx(np.mean(
        [ex.provenance[0][0] in t[:5] for t, ex in zip(titles, examples)]))


def _answer(text: str, titles=()) -> Answer:
    return Answer("q", text, 0.0, tuple(Passage(i, t, "", 0.0) for i, t in enumerate(titles)))


def test_fever_answers_are_mapped_to_labels():
    """Hand-made: "Supports." names SUPPORTS; "refuted" names no class (wrong)."""
    from realm_jax.data.tasks import TaskExample

    ex = [TaskExample(str(i), "claim", ("supports" if lab == "SUPPORTS" else "refutes",),
                      label=lab, provenance=(("A",), ("B", "C")))
          for i, lab in enumerate(["SUPPORTS", "REFUTES", "REFUTES"])]
    answers = [_answer("Supports.", ["A", "X"]), _answer("refutes", ["B", "X"]),
               _answer("refuted", ["C", "B"])]
    summary, _ = common.evaluate_answers(ex, answers, (1, 2), None,
                                         ("accuracy", "rprec", "recall@2"), fever_labels(2))
    assert summary["accuracy"] == pytest.approx(2 / 3)
    # R-precision: A complete at 1 (1); {B, C} needs 2 pages: B, X -> 1/2; C, B -> 1.
    assert summary["rprec"] == pytest.approx((1 + 0.5 + 1) / 3)
    # recall@2: the share of evidence sets complete in the top 2 places: {A} of 2 sets;
    # none ({B, C} half found); {B, C} (C then B: one place).
    assert summary["recall@2"] == pytest.approx((0.5 + 0 + 0.5) / 3)


def test_default_metrics_and_provenance_dropped_without_gold():
    """Without provenance the provenance metrics are left out; em and f1 by default."""
    from realm_jax.data.qa import QAExample

    ex = [QAExample("0", "who?", ("the Beatles",)), QAExample("1", "when?", ("1969",))]
    summary, _ = common.evaluate_answers(ex, [_answer("Beatles"), _answer("in 1969")], (1,))
    assert summary["em"] == summary["exact_match"] == 0.5
    assert summary["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert "rprec" not in common.task_metrics(common.scored_examples(ex, [_answer("x")] * 2),
                                              ["em", "rprec"])


def test_bad_task_settings_are_named():
    from realm_jax.config import load_config

    for override, message in (("data.format=squad", "data.format='squad'"),
                              ("eval.metrics=('bleu9x',)", "eval.metrics"),
                              ("eval.do_sample=True", "eval.do_sample")):
        with pytest.raises(ValueError, match=message):
            rag.check_config(load_config("rag_msmarco:tiny,sequence", override))
    with pytest.raises(ValueError, match="a jeopardy file"):
        rag.load_examples(load_config("rag_jeopardy:tiny"), "train")
