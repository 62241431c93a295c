"""Readers of RAG's other tasks (KILT, MS MARCO NLGen, Jeopardy, FEVER) on small files the
tests write: fields, evidence sets, label sets, skips, and errors naming the file, line,
field and format."""

from __future__ import annotations

import gzip
import json

import pytest

from realm_jax.data.qa import QADataError, QAExample
from realm_jax.data.readers import SkipCounter
from realm_jax.data.tasks import (LabelSet, TaskExample, fever_labels, fever_page_title,
                                  read_fever, read_jeopardy, read_kilt, read_msmarco, read_task)


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def _page(title, wid="1"):
    return {"wikipedia_id": wid, "title": title, "start_paragraph_id": 3, "bleu_score": 1.0}


KILT_NQ = [
    {"id": "-123", "input": "who wrote hamlet",
     "output": [{"answer": "William Shakespeare", "provenance": [_page("Hamlet", "10")]},
                {"answer": "Shakespeare"},
                {"answer": "William Shakespeare",
                 "provenance": [_page("William Shakespeare"), _page("Hamlet"),
                                _page("William Shakespeare")]},
                {"provenance": [_page("Hamlet", "10")]}],           # a repeated set
     "meta": {}},
    "",
    {"id": 7, "input": " capital of france ", "output": [{"answer": "Paris"}]},
]


def test_read_kilt(tmp_path):
    skips = SkipCounter()
    got = read_kilt(_jsonl(tmp_path / "nq-dev-kilt.jsonl", KILT_NQ), skips=skips)
    assert got == [
        TaskExample("-123", "who wrote hamlet", ("William Shakespeare", "Shakespeare"),
                    gold_passages=("Hamlet", "William Shakespeare"),
                    provenance=(("Hamlet",), ("William Shakespeare", "Hamlet"))),
        TaskExample("7", "capital of france", ("Paris",))]
    assert isinstance(got[0], QAExample) and got[0].label is None
    assert skips.as_dict() == {"blank_line": 1}


@pytest.mark.parametrize("record,field,problem", [
    ({"id": "1", "output": [{"answer": "a"}]}, "input", "missing"),
    ({"id": "1", "input": " ", "output": [{"answer": "a"}]}, "input", "empty"),
    ({"id": "1", "input": "q"}, "output", "missing"),
    ({"id": "1", "input": "q", "output": [{"provenance": [_page("A")]}]}, "output",
     "no answer in any output"),
    ({"id": "1", "input": "q", "output": [{"answer": "a", "provenance": [{"wikipedia_id": "3"}]}]},
     "output[0].provenance[0].title", "missing or not a string"),
    ({"id": "1", "input": "q", "output": [{"answer": 3}]}, "output[0].answer", "expected a string"),
    ({"id": [1], "input": "q", "output": [{"answer": "a"}]}, "id", "expected a string or an"),
])
def test_read_kilt_errors_name_the_line_field_and_format(tmp_path, record, field, problem):
    path = _jsonl(tmp_path / "bad.jsonl", [{"id": "0", "input": "ok", "output": [{"answer": "x"}]},
                                          record])
    with pytest.raises(QADataError) as e:
        read_kilt(path)
    message = str(e.value)
    assert message.startswith(f"{path}:2: field {field!r}: {problem}")
    assert message.endswith('expected KILT JSONL: {"id", "input", "output": [{"answer", '
                            '"provenance": [{"wikipedia_id", "title"}]}]}')


def test_read_kilt_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="KILT file not found: .*nope.jsonl"):
        read_kilt(tmp_path / "nope.jsonl")
    rows = [{"id": "a", "input": "q", "output": [{"answer": "x"}]}] * 2
    with pytest.raises(QADataError, match=r":2: field 'id': 'a' repeats the id of .*:1"):
        read_kilt(_jsonl(tmp_path / "twice.jsonl", rows))
    with pytest.raises(QADataError, match=r":1: .*invalid JSON"):
        read_kilt(_jsonl(tmp_path / "broken.jsonl", ["{oops"]))
    with pytest.raises(QADataError, match=r":1: expected a JSON object, got list"):
        read_kilt(_jsonl(tmp_path / "list.jsonl", ["[1]"]))
    with pytest.raises(ValueError, match="no examples in .*blank_line"):
        read_kilt(_jsonl(tmp_path / "empty.jsonl", [""]))


def test_kilt_fever_with_labels(tmp_path):
    rows = [{"id": "1", "input": "Hamlet was written by Shakespeare.",
             "output": [{"answer": "SUPPORTS", "provenance": [_page("Hamlet")]}]},
            {"id": "2", "input": "Paris is in Spain.", "output": [{"answer": "REFUTES"}]},
            {"id": "3", "input": "Who knows.", "output": [{"answer": "NOT ENOUGH INFO"}]}]
    path = _jsonl(tmp_path / "fever-dev-kilt.jsonl", rows)
    skips = SkipCounter()
    got = read_kilt(path, labels=fever_labels(2), skips=skips)
    assert [(e.qid, e.answers, e.label, e.gold_passages) for e in got] == [
        ("1", ("supports",), "SUPPORTS", ("Hamlet",)), ("2", ("refutes",), "REFUTES", ())]
    assert skips.as_dict() == {"label_not_in_set": 1}
    # read_fever reads KILT's layout too, and the 3-way set keeps the third claim
    assert [e.label for e in read_fever(path)] == ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "1", "input": "c", "output": [{"answer": "x"}]}])
    with pytest.raises(QADataError, match=r":1: field 'output': answers \['x'\] are not one "
                                          r"label of \('SUPPORTS', 'REFUTES'\)"):
        read_kilt(bad, labels=fever_labels(2))


# ----------------------------------------------------------------------------- MS MARCO


def test_read_msmarco_official_columns(tmp_path):
    data = {"query": {"0": "what is rba", "1": "define x", "2": "is y blue"},
            "query_id": {"0": 19699, "1": 5, "2": 6},
            "answers": {"0": ["Results-Based Accountability"], "1": ["No Answer Present."],
                        "2": ["yes"]},
            "wellFormedAnswers": {"0": ["RBA is Results-Based Accountability.",
                                        "RBA is Results-Based Accountability."],
                                  "1": "[]", "2": "[]"},
            "query_type": {"0": "DESCRIPTION", "1": "DESCRIPTION", "2": "ENTITY"},
            "passages": {"0": [{"is_selected": 1, "passage_text": "...", "url": "u"}],
                         "1": [], "2": []}}
    path = tmp_path / "dev_v2.1.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)
    skips = SkipCounter()
    assert read_msmarco(path, skips=skips) == [
        TaskExample("19699", "what is rba", ("RBA is Results-Based Accountability.",))]
    assert skips.as_dict() == {"no_well_formed_answer": 2}
    qa = read_msmarco(path, well_formed=False)
    assert [(e.qid, e.answers) for e in qa] == [("19699", ("Results-Based Accountability",)),
                                                ("6", ("yes",))]


def test_read_msmarco_jsonl_and_errors(tmp_path):
    rows = [{"query_id": 1, "query": "q1", "answers": ["a"], "wellFormedAnswers": ["A a."]},
            {"query_id": 2, "query": "q2", "answers": ["b"], "wellFormedAnswers": []}]
    path = _jsonl(tmp_path / "nlgen.jsonl", rows)
    assert [(e.qid, e.question, e.answers) for e in read_msmarco(path)] == [("1", "q1", ("A a.",))]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"query_id": 3, "answers": ["a"]}])
    with pytest.raises(QADataError, match=r"bad.jsonl:1: field 'query': missing; expected MS "
                                          r"MARCO v2.1"):
        read_msmarco(bad)
    bad = _jsonl(tmp_path / "bad2.jsonl", [{"query": "q", "wellFormedAnswers": [3]}])
    with pytest.raises(QADataError, match=r":1: field 'wellFormedAnswers': expected a list"):
        read_msmarco(bad)
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"queries": {}}))
    with pytest.raises(QADataError, match="field 'query': no column object"):
        read_msmarco(cols)
    with pytest.raises(ValueError, match="cannot tell the MS MARCO layout"):
        read_msmarco(_jsonl(tmp_path / "x.tsv", []))


# ----------------------------------------------------------------------------- Jeopardy


def test_read_jeopardy(tmp_path):
    rows = [{"category": "SCIENCE", "air_date": "2004-12-31",
             "question": "'For the last 8 years of his life, Galileo was under house arrest "
                         "for espousing this man's theory'",
             "answer": "Copernicus", "search_results": [{"snippet": "..."}]},
            {"id": "j9", "question": "This 'Hamlet' author", "answer": "Shakespeare"}]
    got = read_jeopardy(_jsonl(tmp_path / "searchqa.jsonl", rows))
    assert got == [
        TaskExample("0", "Copernicus", ("For the last 8 years of his life, Galileo was under "
                                        "house arrest for espousing this man's theory",)),
        TaskExample("j9", "Shakespeare", ("This 'Hamlet' author",))]
    with pytest.raises(QADataError, match=r":1: field 'answer': missing; expected SearchQA"):
        read_jeopardy(_jsonl(tmp_path / "bad.jsonl", [{"question": "clue"}]))


# ----------------------------------------------------------------------------- FEVER


FEVER_ROWS = [
    {"id": 75397, "verifiable": "VERIFIABLE", "label": "SUPPORTS",
     "claim": "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
     "evidence": [[[92206, 104971, "Nikolaj_Coster-Waldau", 7],
                   [92206, 104971, "Fox_Broadcasting_Company", 0]],
                  [[92206, 104972, "Nikolaj_Coster-Waldau", 7]]]},
    {"id": 150448, "verifiable": "VERIFIABLE", "label": "REFUTES",
     "claim": "Savages was exclusively a German film.",
     "evidence": [[[266946, 284417, "Savages_-LRB-2012_film-RRB-", 3]]]},
    {"id": 214861, "verifiable": "NOT VERIFIABLE", "label": "NOT ENOUGH INFO",
     "claim": "Someone did something.", "evidence": [[[255136, None, None, None]]]},
]


def test_read_fever_three_and_two_way(tmp_path):
    path = _jsonl(tmp_path / "shared_task_dev.jsonl", FEVER_ROWS)
    three = read_fever(path)
    assert [(e.qid, e.answers, e.label) for e in three] == [
        ("75397", ("supports",), "SUPPORTS"), ("150448", ("refutes",), "REFUTES"),
        ("214861", ("not enough info",), "NOT ENOUGH INFO")]
    assert three[0].provenance == (("Nikolaj Coster-Waldau", "Fox Broadcasting Company"),
                                   ("Nikolaj Coster-Waldau",))
    assert three[0].gold_passages == ("Nikolaj Coster-Waldau", "Fox Broadcasting Company")
    assert three[1].provenance == (("Savages (2012 film)",),) and three[2].provenance == ()
    skips = SkipCounter()
    two = read_fever(path, labels=fever_labels(2), skips=skips)
    assert [e.label for e in two] == ["SUPPORTS", "REFUTES"]
    assert skips.as_dict() == {"label_not_in_set": 1}
    assert read_task(path, "fever2") == two and read_task(path, "fever") == three


def test_read_fever_errors(tmp_path):
    bad = dict(FEVER_ROWS[0], label="MAYBE")
    with pytest.raises(QADataError, match=r":1: field 'label': 'MAYBE' is not one of "
                                          r"\('SUPPORTS', 'REFUTES', 'NOT ENOUGH INFO'\); "
                                          r"expected FEVER JSONL"):
        read_fever(_jsonl(tmp_path / "a.jsonl", [bad]))
    bad = dict(FEVER_ROWS[0], evidence=[[["Nikolaj_Coster-Waldau", 7]]])
    with pytest.raises(QADataError, match=r"field 'evidence\[0\]': expected \[annotation_id"):
        read_fever(_jsonl(tmp_path / "b.jsonl", [bad]))
    bad = {k: v for k, v in FEVER_ROWS[0].items() if k != "claim"}
    with pytest.raises(QADataError, match=r"field 'claim': missing"):
        read_fever(_jsonl(tmp_path / "c.jsonl", [bad]))


def test_label_sets_map_targets_both_ways():
    two = fever_labels(2)
    assert two.labels == ("SUPPORTS", "REFUTES") and two.target("REFUTES") == "refutes"
    assert two.label_of(" Supports. ") == "SUPPORTS" and two.label_of("REFUTES") == "REFUTES"
    assert two.label_of("not enough info") is None and two.label_of("") is None
    custom = fever_labels(3, targets=["true", "false", "unknown"])
    assert custom.target("NOT ENOUGH INFO") == "unknown"
    assert custom.label_of("False") == "REFUTES" and custom.label_of("not enough info") == \
        "NOT ENOUGH INFO"
    with pytest.raises(ValueError, match="label 'X' is not one of"):
        two.target("X")
    with pytest.raises(ValueError, match="one distinct, non-empty target per label"):
        LabelSet(("A", "B"), ("yes", "Yes."))
    with pytest.raises(ValueError, match="3-way and 2-way"):
        fever_labels(4)


def test_fever_page_title():
    assert fever_page_title("Savages_-LRB-2012_film-RRB-") == "Savages (2012 film)"
    assert fever_page_title("Star_Wars-COLON-_Episode_IV") == "Star Wars: Episode IV"


def test_read_task_by_name(tmp_path):
    path = _jsonl(tmp_path / "j.jsonl", [{"question": "clue", "answer": "A"}])
    assert read_task(path, "jeopardy")[0].answers == ("clue",)
    kilt = _jsonl(tmp_path / "k.jsonl", KILT_NQ[2:])
    assert read_task(kilt, "kilt")[0].answers == ("Paris",)
    with pytest.raises(ValueError, match="unknown task data format 'squad'; expected one of"):
        read_task(path, "squad")
