"""Corpus block store: readers, block splitting, the store, fingerprints, errors."""

from __future__ import annotations

import bz2
import html
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from realm_jax.data import (BlockStore, BlockStoreWriter, SkipCounter, Span, load_tokenizer,
                            prepare_corpus, read_wiki_xml, wikitext_to_text)
from realm_jax.data.blocks import realm_pieces

WIKI_TITLES_FIRST = ("Anarchism", "Autism", "Albedo")


@pytest.fixture(scope="session")
def tok(minilm_path):
    return load_tokenizer(minilm_path)


def _write_jsonl(path: Path, lines: list[bytes | str | dict]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _retokenize(tok, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids) for e in tok.encode_batch(texts)]


# ---------------------------------------------------------------- JSONL


def test_jsonl_round_trip_counts_bad_lines(tmp_path, tok):
    good = [{"id": "a", "title": "Alpha", "text": "Alpha is the first letter. It comes before beta."},
            {"id": 7, "title": "Seven", "text": "Seven is a number."},
            {"id": "c", "title": "", "text": "A document without a title still counts."}]
    src = _write_jsonl(tmp_path / "corpus.jsonl", [
        good[0],
        b'{"id": "u", "title": "Bad", "text": "caf\xe9 latin-1"}',     # bad UTF-8
        '{"id": "j", "title": "Broken", "text": ',                     # invalid JSON
        {"id": "m", "title": "No text"},                               # missing text
        {"id": "t", "text": "no title here"},                          # missing title
        {"title": "No id", "text": "no id here"},                      # missing id
        good[1],
        {"id": "e", "title": "Empty", "text": "   \n "},               # empty text
        "[1, 2, 3]",                                                   # not an object
        {"id": "n", "title": "Number", "text": 5},                     # wrong type
        "",                                                            # blank line
        good[2],
    ])
    out = tmp_path / "store"
    result = prepare_corpus(src, out, tokenizer=tok, progress=False)
    expected_skips = {"bad_utf8": 1, "invalid_json": 1, "missing_field:text": 1,
                      "missing_field:title": 1, "missing_field:id": 1, "empty_text": 1,
                      "not_an_object": 1, "bad_field_type:text": 1, "blank_line": 1}
    assert result.skipped == expected_skips
    assert result.num_documents == 3 and result.num_blocks == 3
    with BlockStore.open(out) as store:
        assert store.manifest["skipped"] == expected_skips
        assert store.manifest["count"] == len(store) == 3
        assert store.fingerprint == result.fingerprint
        assert store.token_dtype == np.uint16
        for i, doc in enumerate(good):
            assert store.doc_id(i) == str(doc["id"])
            assert store.title(i) == doc["title"]
            assert store.text(i) == doc["text"]
            assert store.spans(i) == []
            np.testing.assert_array_equal(store.tokens(i), _retokenize(tok, [doc["text"]])[0])
        assert list(store.doc_index) == [0, 1, 2]
        np.testing.assert_array_equal(store.lengths, [len(store.tokens(i)) for i in range(3)])
    _no_leftovers(tmp_path)


def test_jsonl_pre_annotated_spans_in_byte_offsets(tmp_path, tok):
    """A record's `spans` (UTF-8 byte offsets, as in REALM's preprocessed data) reach the
    store as character spans of the text; spans that do not fit are counted, not kept."""
    text = "Zürich lies on the Limmat. The Romans founded Turicum there in 15 BC."
    data = text.encode()

    def at(word):
        start = data.index(word.encode())
        return [start, start + len(word.encode())]

    src = _write_jsonl(tmp_path / "spans.jsonl", [
        {"id": "z", "title": "Zürich", "text": text,
         "spans": [at("Zürich") + ["LOC"], {**dict(zip(("start", "end"), at("Romans"))),
                                            "label": "NORP"}, at("15 BC")]},
        {"id": "bad", "title": "B", "text": "Short.", "spans": [[0, 99]]},   # past the end
        {"id": "mid", "title": "M", "text": "Zürich.", "spans": [[2, 4]]},  # inside "ü"
    ])
    result = prepare_corpus(src, tmp_path / "store", tokenizer=tok, mode="realm", progress=False)
    assert result.skipped == {"bad_spans": 2} and result.num_documents == 1
    with BlockStore.open(tmp_path / "store") as store:
        got = [(store.text(0)[s.start:s.end], s.target) for s in store.spans(0)]
    assert got == [("Zürich", "LOC"), ("Romans", "NORP"), ("15 BC", "ANNOTATED")]


def test_random_access_multi_block_documents(tmp_path, tok):
    rng = np.random.default_rng(0)
    words = ["river", "mountain", "city", "bridge", "forest", "castle", "harbor", "valley"]
    docs = []
    for d in range(6):
        sentences = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))).capitalize() + "."
                     for _ in range(int(rng.integers(2, 15)))]
        docs.append({"id": f"doc{d}", "title": f"Title {d}", "text": " ".join(sentences)})
    src = _write_jsonl(tmp_path / "c.jsonl", docs)
    prepare_corpus(src, tmp_path / "s", tokenizer=tok, max_tokens=16, progress=False)
    store = BlockStore.open(tmp_path / "s")
    # Rebuild the expected blocks: in order, each document's blocks tile its text.
    by_doc: dict[str, list[int]] = {}
    for i in range(len(store)):
        by_doc.setdefault(store.doc_id(i), []).append(i)
    assert list(by_doc) == [d["id"] for d in docs]
    for d, doc in enumerate(docs):
        ids = by_doc[doc["id"]]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # contiguous, in order
        assert " ".join(store.text(i) for i in ids) == doc["text"]
        assert all(store.title(i) == doc["title"] and store.doc_index[i] == d for i in ids)
        assert all(store.text(i).endswith(".") for i in ids)  # cut at sentence ends
    assert store.lengths.max() <= 16
    order = rng.permutation(len(store))
    for i in order[:20]:
        np.testing.assert_array_equal(store.tokens(i), _retokenize(tok, [store.text(i)])[0])
        rec = store.record(i)
        assert (rec.block_id, rec.text, rec.title) == (i, store.text(i), store.title(i))
    batch, lengths = store.tokens_batch(order[:5])
    assert batch.shape == (5, lengths.max()) and batch.dtype == np.int32
    for row, i in enumerate(order[:5]):
        np.testing.assert_array_equal(batch[row, :lengths[row]], store.tokens(i))
        assert (batch[row, lengths[row]:] == 0).all()
    short, short_len = store.tokens_batch([0, 1], max_length=4)
    assert short.shape == (2, 4) and (short_len <= 4).all()
    with pytest.raises(IndexError, match="out of range"):
        store.tokens(len(store))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.text(3) == store.text(3) and clone.fingerprint == store.fingerprint


def test_fingerprint_is_deterministic_and_content_sensitive(tmp_path, tok):
    docs = [{"id": str(i), "title": f"T{i}", "text": f"Sentence number {i}. Another one here."}
            for i in range(5)]
    a = prepare_corpus(_write_jsonl(tmp_path / "a.jsonl", docs), tmp_path / "sa", tokenizer=tok,
                       progress=False)
    b = prepare_corpus(_write_jsonl(tmp_path / "b.jsonl", docs), tmp_path / "sb", tokenizer=tok,
                       progress=False)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    docs[3]["text"] = docs[3]["text"].replace("number", "Number")
    c = prepare_corpus(_write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "sc", tokenizer=tok,
                       progress=False)
    assert c.fingerprint != a.fingerprint
    d = prepare_corpus(tmp_path / "a.jsonl", tmp_path / "sd", tokenizer=tok, max_tokens=4,
                       progress=False)
    e = prepare_corpus(tmp_path / "a.jsonl", tmp_path / "se", tokenizer=tok, mode="dpr",
                       progress=False)
    assert len({a.fingerprint, d.fingerprint, e.fingerprint}) == 3


def test_empty_and_missing_inputs_are_clear_errors(tmp_path, tok):
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=r"no usable documents in .*empty\.jsonl"):
        prepare_corpus(empty, tmp_path / "s1", tokenizer=tok, progress=False)
    junk = _write_jsonl(tmp_path / "junk.jsonl", ["{not json", {"id": "x", "title": "t"}])
    with pytest.raises(ValueError, match=r"junk\.jsonl.*invalid_json.*missing_field:text"):
        prepare_corpus(junk, tmp_path / "s2", tokenizer=tok, progress=False)
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    _no_leftovers(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        prepare_corpus(tmp_path / "nope.jsonl", tmp_path / "s3", tokenizer=tok, progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        prepare_corpus(empty, tmp_path / "s4", tokenizer=tmp_path / "no_model", progress=False)
    with pytest.raises(FileNotFoundError, match=r"pages\.xml\.bz2"):
        prepare_corpus(tmp_path / "pages.xml.bz2", tmp_path / "s5", tokenizer=tok,
                       progress=False)


def test_store_is_written_atomically(tmp_path, tok):
    settings = {"mode": "realm"}
    with pytest.raises(RuntimeError, match="boom"):
        with BlockStoreWriter(tmp_path / "s", token_dtype=np.uint16, settings=settings) as w:
            w.add(np.arange(5), doc_id="d", title="t", text="x", spans=[], doc_index=0)
            raise RuntimeError("boom")
    assert not (tmp_path / "s").exists()
    _no_leftovers(tmp_path)
    with BlockStoreWriter(tmp_path / "s", token_dtype=np.uint16, settings=settings) as w:
        w.add(np.arange(5), doc_id="d", title="t", text="x", spans=[Span(0, 1, "X")],
              doc_index=0)
        w.finish()
    assert BlockStore.open(tmp_path / "s").spans(0) == [Span(0, 1, "X")]
    with pytest.raises(FileExistsError, match="already exists"):
        BlockStoreWriter(tmp_path / "s", token_dtype=np.uint16, settings=settings)
    # A damaged store is refused when opened.
    tokens = tmp_path / "s" / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ValueError, match="corrupt block store"):
        BlockStore.open(tmp_path / "s")
    _no_leftovers(tmp_path)


def test_overwrite_replaces_store(tmp_path, tok):
    src = _write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "title": "A", "text": "One."}])
    prepare_corpus(src, tmp_path / "s", tokenizer=tok, progress=False)
    with pytest.raises(FileExistsError):
        prepare_corpus(src, tmp_path / "s", tokenizer=tok, progress=False)
    _write_jsonl(src, [{"id": "1", "title": "A", "text": "Two words."}])
    prepare_corpus(src, tmp_path / "s", tokenizer=tok, overwrite=True, progress=False)
    assert BlockStore.open(tmp_path / "s").text(0) == "Two words."
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------- block splitting


def test_long_sentence_is_cut_between_words(tok):
    text = " ".join(["unbelievably", "extraordinary", "photosynthesis"] * 30)  # one sentence
    enc = tok.encode_batch([text])[0]
    offsets = np.asarray(enc.offsets)
    pieces = realm_pieces(text, offsets, np.asarray(enc.word_ids), max_tokens=10)
    assert len(pieces) > 1
    assert [(p.tok_start, p.tok_end) for p in pieces][0][0] == 0 and pieces[-1].tok_end == len(offsets)
    for prev, nxt in zip(pieces, pieces[1:]):
        assert prev.tok_end == nxt.tok_start
        assert text[nxt.char_start - 1] == " "  # never inside a word
    for p in pieces:
        assert p.tok_end - p.tok_start <= 10
        np.testing.assert_array_equal(_retokenize(tok, [text[p.char_start:p.char_end]])[0],
                                      enc.ids[p.tok_start:p.tok_end])


# ---------------------------------------------------------------- wikitext


def test_wikitext_to_text_keeps_link_anchors():
    wikitext = (
        "{{Infobox person|name={{nowrap|A B}}|image=x.jpg}}\n"
        "'''Ada''' was an ''[[Mathematician|English mathematician]]'' from [[London]]ers"
        "<ref name=x>{{cite book|title=T}}</ref> and [[Charles_Babbage#Life|Babbage]]'s friend."
        "<!-- hidden [[Not shown]] -->[[File:Ada.jpg|thumb|A [[portrait]] of Ada]]\n"
        "{| class=wikitable\n|-\n| [[Cell]] || {{x}}\n|}\n"
        "== Early life ==\n* She studied [[wikt:math|math]] and [http://x.org the site].\n"
        "== References ==\n{{reflist}}\n[[Category:Mathematicians]]\n[[de:Ada Lovelace]]")
    text, spans = wikitext_to_text(wikitext)
    assert text == ("Ada was an English mathematician from Londoners and Babbage's friend.\n\n"
                    "Early life\nShe studied math and the site.")
    assert [(text[s:e], t) for s, e, t in spans] == [
        ("English mathematician", "Mathematician"), ("Londoners", "London"),
        ("Babbage", "Charles Babbage")]


@pytest.fixture(scope="module")
def wiki_stores(tmp_path_factory, wiki_sample_path, tok):
    root = tmp_path_factory.mktemp("wiki")
    realm = prepare_corpus(wiki_sample_path, root / "realm", tokenizer=tok, progress=False)
    # The same articles, read once more here, as passages (prepare_corpus takes Documents too).
    skips = SkipCounter()
    docs = list(read_wiki_xml(wiki_sample_path, skips))
    assert skips.as_dict() == realm.skipped
    dpr = prepare_corpus(docs, root / "dpr", tokenizer=tok, mode="dpr", progress=False)
    return realm, dpr


def _wiki_anchors(path: str) -> set[str]:
    """Every link anchor in the dump's wikitext, with quotes, tags and extra blanks removed."""
    raw = html.unescape(bz2.open(path).read().decode())
    anchors = set()
    for m in re.finditer(r"\[\[([^\[\]]*)\]\]([a-z]*)", raw):
        target, pipe, anchor = m.group(1).partition("|")
        anchor = (anchor if pipe else target.lstrip(":")).strip() + m.group(2)
        anchors.add(" ".join(re.sub(r"<[^>]*>|'{2,}", "", anchor).split()))
    return anchors


def test_wiki_sample_realm_blocks(wiki_stores, wiki_sample_path, tok):
    result, _ = wiki_stores
    assert result.num_documents == 106
    assert result.skipped == {"redirect": 99, "non_article_namespace": 1}
    assert result.spans_cut == 0  # blocks end at sentence ends, never inside an anchor
    store = BlockStore.open(result.path)
    assert store.manifest["skipped"] == result.skipped
    assert store.settings["max_tokens"] == 288 and store.settings["mode"] == "realm"
    assert len(store) == result.num_blocks > 1000
    assert store.lengths.max() <= 288 and store.lengths.min() > 0
    assert np.median(store.lengths) > 250  # greedy packing fills blocks
    texts = [store.text(i) for i in range(len(store))]
    for i, ids in zip(range(0, len(store), 4), _retokenize(tok, texts[::4])):
        np.testing.assert_array_equal(ids, store.tokens(i))
    titles = [store.title(i) for i in range(len(store))]
    assert titles[0] == "Anarchism" and store.doc_id(0) == "12"
    assert list(dict.fromkeys(titles))[:3] == list(WIKI_TITLES_FIRST)
    assert len(set(titles)) == 106 and np.all(np.diff(store.doc_index) >= 0)
    assert texts[0].startswith("Anarchism is a political philosophy that advocates")
    first = store.spans(0)
    assert Span(15, 35, "Political philosophy") in first
    assert texts[0][15:35] == "political philosophy"
    anchors = _wiki_anchors(wiki_sample_path)
    spans = [(t, s) for t, i in zip(texts, range(len(store))) for s in store.spans(i)]
    assert len(spans) > 10_000
    matched = sum(t[s.start:s.end] in anchors for t, s in spans)
    assert matched / len(spans) > 0.99  # the rest had templates or &nbsp; inside the anchor
    assert all(t[s.start:s.end] == t[s.start:s.end].strip() != "" for t, s in spans)


def test_wiki_sample_dpr_passages(wiki_stores):
    realm, result = wiki_stores
    assert result.num_documents == 106 and result.skipped == {}
    assert result.manifest["source"] == {"path": "<documents>", "format": "documents"}
    store = BlockStore.open(result.path)
    assert store.settings["passage_words"] == 100 and "max_tokens" not in store.settings
    assert result.num_tokens == realm.num_tokens  # same documents, same tokens
    by_doc: dict[int, list[int]] = {}
    for i in range(len(store)):
        by_doc.setdefault(int(store.doc_index[i]), []).append(i)
    assert len(by_doc) == 106
    for ids in by_doc.values():
        counts = [len(store.text(i).split()) for i in ids]
        assert all(c == 100 for c in counts[:-1]) and 0 < counts[-1] <= 100
        assert len({store.title(i) for i in ids}) == 1
    assert store.title(by_doc[0][1]) == "Anarchism"
    for i in range(0, len(store), 97):
        text = store.text(i)
        for s, e, _ in store.spans(i):
            assert 0 <= s < e <= len(text)


# ---------------------------------------------------------------- TFDS


def _build_tiny_tfds(data_dir: Path, docs: list[dict]) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.core.registered.skip_registration():
        class TinyCorpus(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {k: tfds.features.Text() for k in ("id", "title", "text")}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, doc in enumerate(docs):
                    yield i, doc

    TinyCorpus(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_reader_without_tensorflow(tmp_path, tok):
    docs = [{"id": f"t{i}", "title": f"Doc {i}", "text": f"Text of document {i}. Done."}
            for i in range(7)]
    docs[4]["text"] = " "
    _build_tiny_tfds(tmp_path / "tfds", docs)
    result = prepare_corpus("tfds:tiny_corpus", tmp_path / "s", tokenizer=tok,
                            tfds_data_dir=tmp_path / "tfds", progress=False)
    assert result.skipped == {"empty_text": 1} and result.num_blocks == 6
    store = BlockStore.open(tmp_path / "s")
    want = {d["id"]: d for d in docs if d["text"].strip()}
    got = {store.doc_id(i): (store.title(i), store.text(i)) for i in range(len(store))}
    assert got == {k: (d["title"], d["text"]) for k, d in want.items()}
    assert store.manifest["source"]["format"] == "tfds"
    with pytest.raises(FileNotFoundError, match="'no_such_corpus'.*not available"):
        prepare_corpus("tfds:no_such_corpus", tmp_path / "s2", tokenizer=tok,
                       tfds_data_dir=tmp_path / "tfds", progress=False)
    with pytest.raises(FileNotFoundError, match="not available"):
        prepare_corpus("tfds:tiny_corpus", tmp_path / "s3", tokenizer=tok,
                       tfds_data_dir=tmp_path / "tfds", tfds_split="validation",
                       progress=False)
