"""DPR data: reading DPR JSON / JSONL (errors naming file, record and field), choosing
passages, rows built by hand from the tokenizer, a resumable pipeline, atomic writing, and
hard negatives mined with an exact searcher over hand-made embeddings."""

import dataclasses
import json

import numpy as np
import pytest

from realm_jax.data import BlockStore, load_tokenizer, prepare_corpus
from realm_jax.data.dpr import (DprExampleMaker, DprRecord, Passage, choose_passages,
                                collate_dpr, dpr_dataset, read_dpr, write_dpr)
from realm_jax.data.qa import QADataError
from realm_jax.data.readers import SkipCounter
from realm_jax.data.rows import row
from realm_jax.index.base import NumpySearcher
from realm_jax.index.mining import mine_hard_negatives


def ctx(title, text, **kw):
    return {"title": title, "text": text, **kw}


RECORDS = [
    {"dataset": "toy", "question": "who wrote hamlet", "answers": ["Shakespeare"],
     "positive_ctxs": [ctx("Hamlet", "Hamlet is a play by Shakespeare.", passage_id="7")],
     "negative_ctxs": [ctx("Paris", "Paris is in France."), ctx("Rome", "Rome is old.")],
     "hard_negative_ctxs": [ctx("Macbeth", "Macbeth is a tragedy.", psg_id=9)]},
    {"question": "no positive here", "answers": ["x"], "positive_ctxs": [],
     "negative_ctxs": [], "hard_negative_ctxs": []},
    {"question": "capital of italy", "answers": ["Rome"],
     "positive_ctxs": [ctx("Rome", "Rome is the capital of Italy.")],
     "negative_ctxs": [], "hard_negative_ctxs": []},
]


@pytest.fixture(scope="module")
def tok(minilm_path):
    return load_tokenizer(minilm_path)


def test_read_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in RECORDS))
    for name in ("a.json", "a.jsonl"):
        skips = SkipCounter()
        records = read_dpr(tmp_path / name, skips=skips)
        assert [r.question for r in records] == ["who wrote hamlet", "capital of italy"]
        assert skips.counts["no_positive_ctx"] == 1
        first = records[0]
        assert first.answers == ("Shakespeare",)
        assert first.positive_ctxs == (Passage("Hamlet", "Hamlet is a play by Shakespeare.",
                                               "7"),)
        assert first.hard_negative_ctxs[0].passage_id == "9"
        assert [p.title for p in first.negative_ctxs] == ["Paris", "Rome"]
        assert first.extra == {"dataset": "toy"}
    assert read_dpr(tmp_path / "a.json")[0].where.endswith("a.json record 0")


@pytest.mark.parametrize("record,match", [
    ({"answers": [], "positive_ctxs": []}, r"record 1: field 'question': missing"),
    ({"question": "q", "answers": "a", "positive_ctxs": [ctx("t", "x")],
      "hard_negative_ctxs": [ctx("t", "x"), {"title": "t"}]},
     r"record 1: field 'hard_negative_ctxs\[1\].text': missing"),
    ({"question": "q", "answers": [3], "positive_ctxs": []}, r"record 1: field 'answers'"),
    ({"question": "q", "positive_ctxs": {"title": "t"}},
     r"record 1: field 'positive_ctxs': expected a list"),
    ({"question": "q", "positive_ctxs": [ctx("t", "x", passage_id=[1])]},
     r"record 1: field 'positive_ctxs\[0\].passage_id'"),
])
def test_bad_records_name_file_record_and_field(tmp_path, record, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([RECORDS[0], record]))
    with pytest.raises(QADataError, match=r"bad\.json " + match):
        read_dpr(path)


def test_bad_files(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(QADataError, match=r"x\.jsonl:2: invalid JSON"):
        read_dpr(tmp_path / "x.jsonl")
    (tmp_path / "y.json").write_text(json.dumps(RECORDS[0]))
    with pytest.raises(QADataError, match="expected a JSON array"):
        read_dpr(tmp_path / "y.json")
    (tmp_path / "z.json").write_text(json.dumps([RECORDS[1]]))
    with pytest.raises(ValueError, match="no usable DPR record"):
        read_dpr(tmp_path / "z.json")
    with pytest.raises(ValueError, match="cannot tell the DPR file format"):
        write_dpr(tmp_path / "w.txt", [])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_dpr(tmp_path / "missing.json")


def test_choose_passages_hard_first_then_negatives():
    record = read_dpr_records()[0]
    rng = np.random.default_rng(0)
    pos, negs = choose_passages(record, 2, rng, shuffle=False)
    assert pos.title == "Hamlet"
    assert [p.title for p in negs] == ["Macbeth", "Paris"]
    _, negs = choose_passages(record, 5, rng, shuffle=False)
    assert [p.title for p in negs] == ["Macbeth", "Paris", "Rome"]
    seen = {tuple(p.title for p in choose_passages(record, 2, np.random.default_rng(s))[1])
            for s in range(30)}
    assert seen == {("Macbeth", "Paris"), ("Macbeth", "Rome")}  # hard ones always first


def read_dpr_records():
    from realm_jax.data.dpr import parse_dpr_record
    return [parse_dpr_record(r, f"r{i}") for i, r in enumerate(RECORDS) if r["positive_ctxs"]]


def test_rows_by_hand(tok):
    maker = DprExampleMaker(tok, num_hard_negatives=2, question_length=8, passage_length=16,
                            shuffle=False)
    cls, sep = tok.backend.token_to_id("[CLS]"), tok.backend.token_to_id("[SEP]")
    ids = lambda s: tok.encode_batch([s])[0].ids  # noqa: E731
    records = read_dpr_records()
    batch = collate_dpr([maker.example(r, np.random.default_rng(0)) for r in records])
    q = [cls] + ids("capital of italy") + [sep]
    assert batch["question_input_ids"].shape == (2, 8)
    assert batch["question_input_ids"][1].tolist() == q + [0] * (8 - len(q))
    assert batch["passage_input_ids"].shape == (6, 16)
    want = [cls] + ids("Hamlet") + [sep] + ids("Hamlet is a play by Shakespeare.") + [sep]
    assert batch["passage_input_ids"][0].tolist() == (want + [0] * 16)[:16]
    want = [cls] + ids("Macbeth") + [sep] + ids("Macbeth is a tragedy.") + [sep]
    assert batch["passage_input_ids"][1].tolist() == want + [0] * (16 - len(want))
    # The second question has no negative: its two slots are empty and invalid.
    np.testing.assert_array_equal(batch["passage_valid"], [1, 1, 1, 1, 0, 0])
    assert batch["passage_attention_mask"][4:].sum() == 0
    untitled = DprExampleMaker(tok, num_hard_negatives=0, passage_length=16, title=False)
    row = untitled.example(records[1], np.random.default_rng(0))["passage_input_ids"][0]
    want = [cls] + ids("Rome is the capital of Italy.") + [sep]
    assert row.tolist() == want + [0] * (16 - len(want))


def test_pipeline_resumes_and_splits_hosts(tok):
    records = read_dpr_records() * 3
    maker = DprExampleMaker(tok, num_hard_negatives=1, question_length=8, passage_length=16)
    it = iter(dpr_dataset(records, maker, batch_size=4, seed=1))
    first = next(it)
    assert first["passage_input_ids"].shape == (8, 16)
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    resumed = iter(dpr_dataset(records, maker, batch_size=4, seed=1))
    resumed.set_state(state)
    for want in after:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    half = next(iter(dpr_dataset(records, maker, batch_size=4, seed=1, process_index=1,
                                 process_count=2)))
    np.testing.assert_array_equal(half["question_input_ids"], first["question_input_ids"][2:])
    np.testing.assert_array_equal(half["passage_input_ids"], first["passage_input_ids"][4:])


def test_row_truncation():
    ids, mask = row(range(10, 20), 6, cls_id=1, sep_id=2, pad_id=0)
    assert ids.tolist() == [1, 10, 11, 12, 13, 2] and mask.tolist() == [1] * 6
    # A title keeps at most half the row; the text gets what is left, the [SEP]s stay.
    ids, _ = row([30, 31], 9, cls_id=1, sep_id=2, title_ids=[20, 21, 22, 23, 24, 25])
    assert ids.tolist() == [1, 20, 21, 22, 23, 2, 30, 31, 2]
    ids, mask = row([30, 31, 32], 8, cls_id=1, sep_id=2, title_ids=[20, 21, 22, 23, 24])
    assert ids.tolist() == [1, 20, 21, 22, 23, 2, 30, 2] and mask.sum() == 8
    ids, mask = row([30], 8, cls_id=1, sep_id=2, pad_id=5, title_ids=[20])
    assert ids.tolist() == [1, 20, 2, 30, 2, 5, 5, 5] and mask.tolist() == [1] * 5 + [0] * 3


@pytest.mark.parametrize("name", ["out.json", "out.jsonl", "out.jsonl.gz"])
def test_write_round_trip(tmp_path, name):
    records = read_dpr_records()
    write_dpr(tmp_path / name, records)
    back = read_dpr(tmp_path / name)
    assert [r.to_json() for r in back] == [r.to_json() for r in records]
    assert back[0].extra == {"dataset": "toy"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- mining

PASSAGES = [
    ("Hamlet", "Hamlet is a play by Shakespeare."),       # 0: the positive
    ("Globe", "The Globe staged works of Shakespeare."),  # 1: holds the answer
    ("Macbeth", "Macbeth is a Scottish tragedy."),        # 2: negative
    ("Othello", "Othello is set in Venice."),             # 3: negative
    ("Lear", "King Lear divides his kingdom."),           # 4: negative (ranked last)
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, minilm_path):
    folder = tmp_path_factory.mktemp("mining")
    with open(folder / "docs.jsonl", "w") as f:
        for i, (title, text) in enumerate(PASSAGES):
            f.write(json.dumps({"id": f"p{i}", "title": title, "text": text}) + "\n")
    result = prepare_corpus(folder / "docs.jsonl", folder / "store", tokenizer=minilm_path,
                            mode="dpr", passage_words=100, progress=False)
    with BlockStore.open(result.path) as s:
        yield s


def test_mine_hard_negatives(tmp_path, store):
    assert len(store) == 5
    records = read_dpr_records()[:1]
    searcher = NumpySearcher(np.eye(5, dtype=np.float32))
    question = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], np.float32)  # ranks blocks 0, 1, 2, 3, 4
    mined, stats = mine_hard_negatives(records, question, searcher, store, num_negatives=2,
                                       depth=5)
    negs = mined[0].hard_negative_ctxs
    assert [(p.title, p.text, p.passage_id, p.block_id) for p in negs] == [
        ("Macbeth", "Macbeth is a Scottish tragedy.", "p2", 2),
        ("Othello", "Othello is set in Venice.", "p3", 3)]
    assert stats.as_dict() == {"questions": 1, "short": 0, "with_answer": 1, "positives": 1}
    assert mined[0].negative_ctxs == records[0].negative_ctxs
    # Kept after the record's own; a short list is counted; the positive found by its id.
    by_id = dataclasses.replace(records[0], positive_ctxs=(
        Passage("Renamed", "other text", passage_id="p0"),))
    mined, stats = mine_hard_negatives([by_id], question, searcher, store, num_negatives=4,
                                       depth=5, keep_existing=True)
    assert [p.title for p in mined[0].hard_negative_ctxs] == ["Macbeth", "Macbeth", "Othello",
                                                              "Lear"]
    assert stats.short == 1 and stats.positives == 1
    write_dpr(tmp_path / "mined.json", mined)
    assert read_dpr(tmp_path / "mined.json")[0].hard_negative_ctxs[1].block_id == 2
    with pytest.raises(ValueError, match=r"question_embeddings must be \[1, 5\]"):
        mine_hard_negatives(records, np.zeros((2, 5)), searcher, store, num_negatives=1)
    with pytest.raises(ValueError, match="index is not over this store"):
        mine_hard_negatives(records, np.arange(8.0)[None],
                            NumpySearcher(np.eye(8, dtype=np.float32)), store, num_negatives=1,
                            depth=8)


def test_rows_match_the_corpus_embedder(store, minilm_path, tok):
    """A passage row equals the row the corpus embedder builds for the same block, so the
    towers train on what the index embeds."""
    from realm_jax.index.embed_corpus import RowBuilder

    for length in (12, 64):
        builder = RowBuilder.for_store(store, minilm_path, max_length=length)
        for i, want in enumerate(builder.rows(range(len(store)))):
            title = tok.encode_batch([store.title(i)])[0].ids
            ids, mask = row(store.tokens(i), length, cls_id=builder.cls_id,
                            sep_id=builder.sep_id, title_ids=title)
            assert ids[:mask.sum()].tolist() == want.tolist()


def test_bm25_negatives(store):
    pytest.importorskip("bm25s")
    from realm_jax.index.mining import bm25_ranking, mine_bm25_negatives

    ranked = bm25_ranking(store, ["scottish tragedy", "zebra"], depth=6)
    assert ranked.shape == (2, 6)
    assert ranked[0, 0] == 2 and (ranked[1] == -1).all()  # no shared term: nothing ranked
    record = DprRecord(
        question="Shakespeare play tragedy Venice", answers=("Shakespeare",),
        positive_ctxs=(Passage("Hamlet", "Hamlet is a play by Shakespeare."),))
    mined, stats = mine_bm25_negatives([record], store, num_negatives=3, depth=5)
    # Blocks 0 (positive) and 1 (holds "Shakespeare") are left out; 4 shares no term.
    assert sorted(p.block_id for p in mined[0].hard_negative_ctxs) == [2, 3]
    assert stats.positives == 1 and stats.with_answer == 1 and stats.short == 1
