"""QA datasets: JSONL/JSON/TSV files and their errors, TFDS (unprepared: fails fast; tiny
prepared array_record datasets), cloze questions from a block store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from realm_jax.data import BlockStore, SkipCounter, load_tokenizer, prepare_corpus
from realm_jax.data.qa import (QADataError, QAExample, load_qa, load_tfds_qa,
                               questions_from_store, read_qa, tfds_record_to_example)
from realm_jax.evaluate import has_answer


def _write(path: Path, lines: list[str | dict | list]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- files


def test_read_jsonl_fields(tmp_path):
    path = _write(tmp_path / "nq-open.jsonl", [
        {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
        "",
        {"question": " capital of france ", "answers": "Paris", "id": 17,
         "gold_passages": ["France", 42]},
        {"question": "q3", "answers": ["x"], "qid": "abc",
         "positive_ctxs": [{"title": "X", "text": "x"}, {"title": "Y", "text": "y"}]},
    ])
    skips = SkipCounter()
    examples = read_qa(path, skips=skips)
    assert examples == [
        QAExample("0", "who wrote hamlet", ("Shakespeare", "William Shakespeare")),
        QAExample("17", "capital of france", ("Paris",), gold_passages=("France", "42")),
        QAExample("abc", "q3", ("x",), gold_passages=("X", "Y")),
    ]
    assert skips.as_dict() == {"blank_line": 1}


def test_read_dpr_json_array_and_gzip(tmp_path):
    import gzip
    records = [{"question": "q1", "answers": ["a"], "positive_ctxs": [{"title": "T"}]},
               {"question": "q2", "answers": ["b", "c"]}]
    (tmp_path / "nq-dev.json").write_text(json.dumps(records))
    assert [e.gold_passages for e in read_qa(tmp_path / "nq-dev.json")] == [("T",), ()]
    with gzip.open(tmp_path / "qs.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    assert [e.answers for e in read_qa(tmp_path / "qs.jsonl.gz")] == [("a",), ("b", "c")]


def test_read_tsv_list_literals_and_pipes(tmp_path):
    path = _write(tmp_path / "nq-test.qa.csv", [
        "question\tanswers",
        "who sings does he love me with reba\t['Linda Davis']",
        'what is the name of durst\'s group\t["Limp Bizkit", "limp bizkit"]',
        "capital of france\tParis|Paris, France",
    ])
    examples = read_qa(path)
    assert [(e.qid, e.question, e.answers, e.is_regex) for e in examples] == [
        ("0", "who sings does he love me with reba", ("Linda Davis",), False),
        ("1", "what is the name of durst's group", ("Limp Bizkit", "limp bizkit"), False),
        ("2", "capital of france", ("Paris", "Paris, France"), False)]


def test_read_curated_trec_regex(tmp_path):
    path = _write(tmp_path / "CuratedTrec-test.txt", [
        "how tall is the tower\t\\d+ (feet|ft)",
        "who founded the republic\t['Sun Yat-?sen', 'Sun Yixian']",
    ])
    examples = read_qa(path)
    assert [(e.answers, e.is_regex) for e in examples] == [
        ((r"\d+ (feet|ft)",), True), (("Sun Yat-?sen", "Sun Yixian"), True)]
    # the same file read as plain answers splits at "|"
    assert read_qa(path, regex=False)[0].answers == (r"\d+ (feet", "ft)")
    jsonl = _write(tmp_path / "qs.jsonl", [{"question": "q", "answer": ["\\d+ (feet|ft)"]}])
    assert read_qa(jsonl, regex=True)[0].is_regex


BAD_ROWS = [
    # (file name, lines, line number of the error, field named (or None), message part)
    ("a.jsonl", [{"answers": ["x"]}], 1, "question", "missing"),
    ("a.jsonl", [{"question": "ok", "answers": ["x"]}, {"question": "  ", "answers": ["x"]}],
     2, "question", "empty"),
    ("a.jsonl", [{"question": 5, "answers": ["x"]}], 1, "question", "expected a string"),
    ("a.jsonl", [{"question": "q"}], 1, "answers", "missing"),
    ("a.jsonl", [{"question": "q", "answers": []}], 1, "answers", "empty"),
    ("a.jsonl", [{"question": "q", "answers": [" "]}], 1, "answers", "blank"),
    ("a.jsonl", [{"question": "q", "answers": 3}], 1, "answers", "expected a list"),
    ("a.jsonl", [{"question": "q", "answer": ["a", None]}], 1, "answer", "item 1 is NoneType"),
    ("a.jsonl", ["", '{"question": "q", "answers": ['], 2, None, "invalid JSON"),
    ("a.jsonl", [["q", "a"]], 1, None, "expected a JSON object"),
    ("a.jsonl", [{"question": "q", "answers": ["a"], "positive_ctxs": [{"text": "t"}]}], 1,
     "positive_ctxs", "'title'"),
    ("a.jsonl", [{"question": "q", "answers": ["a"], "id": 1},
                 {"question": "r", "answers": ["b"], "id": "1"}], 2, "id", "repeats"),
    ("a.tsv", ["q\t['a'"], 1, "answers", "unparsable list literal"),
    ("a.tsv", ["q\t[1, 2]"], 1, "answers", "item 0 is int"),
    ("a.tsv", ["ok\tfine", "no answers here"], 2, "answers", "missing"),
    ("a.tsv", ["q\ta\tb"], 1, None, "expected 2 tab-separated fields"),
    ("a.tsv", ["q\t"], 1, "answers", "empty"),
    ("a.tsv", ["q\ta||b"], 1, "answers", "blank answer"),
    ("a.tsv", ["\ta"], 1, "question", "empty"),
    ("trec.tsv", ["q\t(unclosed"], 1, "answers", "invalid answer regular expression"),
]


@pytest.mark.parametrize("name,lines,lineno,field,problem", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, name, lines, lineno, field, problem):
    path = _write(tmp_path / name, lines)
    with pytest.raises(QADataError) as info:
        read_qa(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{lineno}: ")
    assert problem in message
    assert info.value.field == field
    if field:
        assert f"field {field!r}" in message


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="QA file not found"):
        read_qa(tmp_path / "missing.jsonl")
    (tmp_path / "qs.parquet").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the QA file format"):
        read_qa(tmp_path / "qs.parquet")
    empty = _write(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"no questions in .*blank_line': 2"):
        read_qa(empty)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "q", "answers": ["a"]}\n'
                                            b'{"question": "caf\xe9", "answers": ["a"]}\n')
    with pytest.raises(QADataError, match=r"latin1.jsonl:2: not UTF-8"):
        read_qa(tmp_path / "latin1.jsonl")
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    with pytest.raises(ValueError, match="expected a JSON array"):
        read_qa(tmp_path / "obj.json")
    with pytest.raises(TypeError, match="not the string"):
        QAExample("1", "q", "Paris")


def test_load_qa_dispatch(tmp_path):
    path = _write(tmp_path / "qs.jsonl", [{"question": "q", "answers": ["a"]}])
    assert load_qa(path) == load_qa(str(path)) == read_qa(path)
    with pytest.raises(ValueError, match="neither a QA file"):
        load_qa("not_a_dataset")
    with pytest.raises(FileNotFoundError, match="QA file not found"):
        load_qa(tmp_path / "missing.tsv")
    for spec in ("tfds:natural_questions_open", "web_questions"):
        with pytest.raises(FileNotFoundError, match="is not prepared"):
            load_qa(spec, data_dir=tmp_path)


# ---------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name,dataset", [
    ("natural_questions_open", "natural_questions_open"),
    ("web_questions", "web_questions"),
    ("trivia_qa", "trivia_qa/unfiltered.nocontext"),
    ("trivia_qa/rc.nocontext", "trivia_qa/rc.nocontext"),
])
def test_unprepared_tfds_fails_fast(tmp_path, name, dataset):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_tfds_qa(name, "validation", data_dir=tmp_path)
    assert time.perf_counter() - start < 3
    message = str(info.value)
    assert f"TFDS dataset {dataset!r} is not prepared in {tmp_path}" in message
    assert f"tfds build {dataset} --data_dir {tmp_path} --file_format array_record" in message
    assert "download_and_prepare()" in message
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded


def _fake_info(root: Path, dataset: str, version: str, splits: list[str], fmt: str) -> None:
    folder = root / dataset / version
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps(
        {"name": dataset, "fileFormat": fmt, "splits": [{"name": s} for s in splits]}))


def test_tfds_wrong_format_split_or_name(tmp_path):
    _fake_info(tmp_path, "web_questions", "1.0.0", ["train", "test"], "tfrecord")
    with pytest.raises(ValueError, match="prepared as tfrecord.*--file_format array_record"):
        load_tfds_qa("web_questions", "test", data_dir=tmp_path)
    _fake_info(tmp_path, "natural_questions_open", "1.0.0", ["train", "validation"],
               "array_record")
    with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train', 'validation'\]"):
        load_tfds_qa("natural_questions_open", "test", data_dir=tmp_path)
    (tmp_path / "natural_questions_open" / "incomplete.ABC_1.0.1").mkdir()
    with pytest.raises(FileNotFoundError, match="version 1.0.1 is not prepared"):
        load_tfds_qa("natural_questions_open:1.0.1", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no QA reader for TFDS dataset 'squad'"):
        load_tfds_qa("squad", "train", data_dir=tmp_path)


def test_tfds_records_to_examples():
    nq = tfds_record_to_example("natural_questions_open", {
        "question": b"who wrote hamlet", "answer": np.array([b"Shakespeare"], dtype=object)}, 4)
    assert nq == QAExample("4", "who wrote hamlet", ("Shakespeare",))
    wq = tfds_record_to_example("web_questions", {
        "question": np.bytes_(b"what is france's capital?"), "url": b"u",
        "answers": [b"Paris", "Caf\u00e9".encode()]}, 0)
    assert wq.answers == ("Paris", "Caf\u00e9")
    record = {"question": b"Which city?", "question_id": b"tc_9",
              "answer": {"value": b"Paris", "aliases": [b"Paris", b"City of Light"],
                         "normalized_value": b"paris"}}
    tq = tfds_record_to_example("trivia_qa/unfiltered.nocontext", record, 0)
    assert (tq.qid, tq.answers) == ("tc_9", ("Paris", "City of Light"))
    hidden = {"question": b"q", "question_id": b"t", "answer": {"value": b"", "aliases": []}}
    with pytest.raises(QADataError, match=r"tfds:trivia_qa/unfiltered.nocontext\[test\] record 3:"
                                          r" field 'answers': empty .*'validation'"):
        tfds_record_to_example("trivia_qa/unfiltered.nocontext", hidden, 3,
                               where="tfds:trivia_qa/unfiltered.nocontext[test] record 3")


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """Tiny array_record builds of the three datasets (same names, features and versions as
    the TFDS builders; built locally, no TensorFlow, no network)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    text, seq = tfds.features.Text, tfds.features.Sequence
    root = tmp_path_factory.mktemp("tfds")
    rows = {
        "natural_questions_open": ("validation", [
            {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
            {"question": "capital of france", "answer": ["Paris"]}]),
        "web_questions": ("test", [
            {"url": "u", "question": "where is the eiffel tower?", "answers": ["Paris"]}]),
        "trivia_qa": ("validation", [
            {"question": "Which city?", "question_id": "tc_1",
             "answer": {"value": "Paris", "aliases": ["Paris", "Paree"]}}]),
    }
    features = {
        "natural_questions_open": {"question": text(), "answer": seq(text())},
        "web_questions": {"url": text(), "question": text(), "answers": seq(text())},
        "trivia_qa": {"question": text(), "question_id": text(),
                      "answer": tfds.features.FeaturesDict({"value": text(),
                                                            "aliases": seq(text())})},
    }
    for name, version in (("natural_questions_open", "1.0.0"), ("web_questions", "1.0.0"),
                          ("trivia_qa", "1.1.0")):
        split, examples = rows[name]

        class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
            VERSION = tfds.core.Version(version)
            BUILDER_CONFIGS = ([tfds.core.BuilderConfig(name="unfiltered.nocontext")]
                               if name == "trivia_qa" else [])

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self, features=tfds.features.FeaturesDict(features[self.name]))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples()}

            def _generate_examples(self):
                yield from enumerate(examples)

        Tiny.name = name
        Tiny(data_dir=root, file_format="array_record").download_and_prepare()
    return root


def test_tfds_prepared_datasets(tiny_tfds):
    nq = load_tfds_qa("natural_questions_open", "validation", data_dir=tiny_tfds)
    assert sorted((e.question, e.answers) for e in nq) == [
        ("capital of france", ("Paris",)),
        ("who wrote hamlet", ("Shakespeare", "William Shakespeare"))]
    assert sorted(e.qid for e in nq) == ["0", "1"]
    wq = load_qa("web_questions", split="test", data_dir=tiny_tfds)
    assert [(e.question, e.answers) for e in wq] == [("where is the eiffel tower?", ("Paris",))]
    tq = load_qa("tfds:trivia_qa", split="validation", data_dir=tiny_tfds)
    assert [(e.qid, e.answers) for e in tq] == [("tc_1", ("Paris", "Paree"))]


# ---------------------------------------------------------------- from a store


@pytest.fixture(scope="module")
def tok(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def wiki_store(tmp_path_factory, wiki_sample_path, tok):
    out = tmp_path_factory.mktemp("qa") / "store"
    prepare_corpus(wiki_sample_path, out, tokenizer=tok, max_documents=5, progress=False)
    with BlockStore.open(out) as store:
        yield store


def test_questions_from_store(wiki_store, tok):
    qs = questions_from_store(wiki_store, tok, num=12, seed=3)
    assert len(qs) == 12 and len({q.source_block for q in qs}) == 12
    assert qs == questions_from_store(wiki_store, tok, num=12, seed=3)
    assert qs != questions_from_store(wiki_store, tok, num=12, seed=4)
    for q in qs:
        record = wiki_store.record(q.source_block)
        assert q.qid == f"store-{q.source_block}" and not q.is_regex
        assert q.gold_passages == (record.title,)
        (answer,) = q.answers
        assert q.question.count("_") >= 1
        # the sentence with the blank filled in is in the block, and the block holds the answer
        before, _, after = q.question.partition("_")
        assert before + answer + after in record.text
        assert has_answer(record.text, q.answers)
    some = questions_from_store(wiki_store, tok, num=100, seed=0, block_ids=[0, 1, 2])
    assert {q.source_block for q in some} <= {0, 1, 2} and 1 <= len(some) <= 3
    with pytest.raises(ValueError, match="num must be >= 1"):
        questions_from_store(wiki_store, tok, num=0, seed=0)
