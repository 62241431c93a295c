"""Salient spans, sentence splitting and REALM masked queries (on hand-made sentences and
the real Wikipedia sample)."""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest

from realm_jax.data import BlockStore, Span, load_tokenizer, prepare_corpus
from realm_jax.data.realm_examples import (SKIP_REASONS, QueryMaker, candidate_tokens,
                                           collate_queries)
from realm_jax.data.spans import (CapitalizedPhraseFinder, CombinedFinder, DateFinder,
                                  NumberFinder, SalientSpan, SpacyFinder, anchor_spans,
                                  make_finder, parse_span_annotations, resolve_overlaps,
                                  split_sentences)
from realm_jax.objectives.realm import exclude_source


def texts(text: str, spans) -> list[str]:
    return [text[s[0]:s[1]] for s in spans]


# ----------------------------------------------------------------------------- finders


@pytest.mark.parametrize("text, expected", [
    ("Einstein was born on 14 March 1879 in Ulm.", ["14 March 1879"]),
    ("On March 14, 1879, he was born; by July 1969 men walked on the Moon.",
     ["March 14, 1879", "July 1969"]),
    ("Music of the 1960s and the mid-1990s.", ["1960s", "1990s"]),
    ("The war (1914–1918) began on 28 July and ended on November 11.",
     ["1914", "1918", "28 July", "November 11"]),
    ("Caesar died in 44 BC; Vesuvius erupted in AD 79, during the 1st century AD.",
     ["44 BC", "AD 79", "1st century AD"]),
    ("It opened 1958-07-29, in the nineteenth century style.",
     ["1958-07-29", "nineteenth century"]),
    ("Not dates: 18790 items, $1999, 1999%, 3.1879, 1,879 people, may 5, 1879s.", []),
])
def test_date_finder(text, expected):
    assert texts(text, DateFinder()(text)) == expected
    assert all(s.label == "DATE" for s in DateFinder()(text))


def test_number_finder():
    text = "It cost $5 million, about 45% of 1,000,000 francs, or 3.14 each (2nd try, B52)."
    assert texts(text, NumberFinder()(text)) == ["$5 million", "45%", "1,000,000", "3.14"]


@pytest.mark.parametrize("text, expected", [
    ("Albert Einstein worked at the University of Zürich with Marcel Grossmann.",
     ["Albert Einstein", "University of Zürich", "Marcel Grossmann"]),
    ("The Beatles' first album was recorded in London. Researchers disagree.",
     ["Beatles", "London"]),                  # "The" trimmed; "Researchers" only starts a sentence
    ("J. R. R. Tolkien taught at Oxford. Dr. Smith's house is in New York City.",
     ["J. R. R. Tolkien", "Oxford", "Smith", "New York City"]),
    # "France" only starts a sentence: dropped; "Paris" is also seen mid-sentence: kept.
    ("France and Germany signed it. NASA agreed, and so did Paris. Paris is big.",
     ["Germany", "NASA", "Paris", "Paris"]),
    ("In Paris, Ludwig van Beethoven met Jean-Paul Sartre.",
     ["Paris", "Ludwig van Beethoven", "Jean-Paul Sartre"]),
    ("it was raining, he said.", []),
])
def test_capitalized_phrase_finder(text, expected):
    assert texts(text, CapitalizedPhraseFinder()(text)) == expected


def test_combined_finder_resolves_overlaps_longest_first():
    text = "In March 1879 the Treaty of Paris was signed."
    found = CombinedFinder([DateFinder(), CapitalizedPhraseFinder()])(text)
    assert [(text[s.start:s.end], s.label) for s in found] == [
        ("March 1879", "DATE"), ("Treaty of Paris", "PHRASE")]
    spans = [SalientSpan(0, 5, "A"), SalientSpan(3, 9, "B"), SalientSpan(3, 9, "C"),
             SalientSpan(10, 12, "D")]
    assert resolve_overlaps(spans) == [SalientSpan(3, 9, "B"), SalientSpan(10, 12, "D")]


def test_make_finder():
    text = "Since 1879 the bank lent $5 million to Rome."
    assert texts(text, make_finder("dates")(text)) == ["1879"]
    assert texts(text, make_finder("dates+numbers+capitalized")(text)) == [
        "1879", "$5 million", "Rome"]
    assert make_finder("none") is None
    assert isinstance(make_finder("spacy:en_core_web_md"), SpacyFinder)
    with pytest.raises(ValueError, match="unknown span finder 'ner'"):
        make_finder("dates+ner")


class _FakeEnt:
    def __init__(self, start, end, label):
        self.start_char, self.end_char, self.label_ = start, end, label


class _FakeNlp:
    """Stands in for a loaded spaCy pipeline (anything returning a doc with ``ents``)."""

    def __call__(self, text):
        doc = type("Doc", (), {})()
        doc.ents = [_FakeEnt(0, 6, "PERSON"), _FakeEnt(16, 20, "CARDINAL"),
                    _FakeEnt(24, 29, "DATE")]
        return doc


def test_spacy_finder_with_a_loaded_pipeline_and_missing_package(monkeypatch):
    text = "Turing was born 1912 in June."
    assert texts(text, SpacyFinder(_FakeNlp())(text)) == ["Turing", "June."]
    assert texts(text, SpacyFinder(_FakeNlp(), labels={"CARDINAL"})(text)) == ["1912"]
    monkeypatch.setitem(sys.modules, "spacy", None)   # as if spaCy were not installed
    with pytest.raises(ImportError, match=r"pip install spacy.*spacy download en_core_web_sm"):
        SpacyFinder("en_core_web_sm")(text)


def test_spacy_finder_with_spacy(tmp_path):
    """Runs where spaCy is installed: a saved pipeline loaded by path (no model download),
    and en_core_web_sm when that is installed too."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([
        {"label": "PERSON", "pattern": "Alan Turing"}, {"label": "GPE", "pattern": "London"},
        {"label": "CARDINAL", "pattern": "42"}])
    nlp.to_disk(tmp_path / "pipeline")
    text = "Alan Turing lived in London at number 42."
    assert texts(text, SpacyFinder(str(tmp_path / "pipeline"))(text)) == ["Alan Turing", "London"]
    with pytest.raises(OSError, match="spacy download no_such_pipeline"):
        SpacyFinder("no_such_pipeline")(text)
    try:
        spacy.load("en_core_web_sm")
    except OSError:
        return
    text = "Alan Turing was born in London on 23 June 1912."
    found = texts(text, SpacyFinder("en_core_web_sm")(text))
    assert "Alan Turing" in found and "London" in found


# ----------------------------------------------------------------------------- sentences


def test_sentence_splitting():
    text = ("Dr. Smith met J. R. R. Tolkien in Oxford, e.g. at St. John's. It rained! "
            "\"Why?\" he asked. The U.S. Army agreed.\nHeading line\n\n"
            "A sentence ending in 1879. 42 came next... and then?")
    got = texts(text, split_sentences(text))
    assert got == ["Dr. Smith met J. R. R. Tolkien in Oxford, e.g. at St. John's.", "It rained!",
                   "\"Why?\" he asked.", "The U.S. Army agreed.", "Heading line",
                   "A sentence ending in 1879.", "42 came next... and then?"]
    # No boundary inside a protected span (an anchor such as "Apple Inc. Ltd. Corp").
    text = "They met Mike. Jones at noon. Then left."
    assert len(split_sentences(text)) == 3
    assert texts(text, split_sentences(text, [(9, 20)])) == ["They met Mike. Jones at noon.",
                                                             "Then left."]


def test_anchor_spans_keep_entities():
    text = "Anarchism is a political philosophy. The French Revolution of 1789 used the state."
    spans = [Span(0, 9, "Anarchism"), Span(15, 35, "Political philosophy"),
             Span(41, 58, "French Revolution"), Span(62, 66, "1789"), Span(76, 81, "State")]
    sentences = split_sentences(text)
    assert texts(text, anchor_spans(text, spans, sentences)) == ["French Revolution", "1789"]
    assert len(anchor_spans(text, spans, sentences, "all")) == 5
    assert anchor_spans(text, spans, sentences, "none") == []


def test_parse_span_annotations():
    text = "Ünïcode Paris and Zürich."
    assert parse_span_annotations([[8, 13], {"start": 18, "end": 24, "label": "GPE"}], text) == [
        Span(8, 13, "ANNOTATED"), Span(18, 24, "GPE")]
    b = text.encode()
    start = b.index("Zürich".encode())
    spans = parse_span_annotations([[start, start + len("Zürich".encode()), "LOC"]], text,
                                   offsets="byte")
    assert texts(text, spans) == ["Zürich"]
    with pytest.raises(ValueError, match="inside a UTF-8 character"):
        parse_span_annotations([[1, 4]], text, offsets="byte")
    with pytest.raises(ValueError, match="0 <= start < end"):
        parse_span_annotations([[5, 99]], text)
    with pytest.raises(ValueError, match="bad span"):
        parse_span_annotations([[1, 2, 3, 4]], text)


# ----------------------------------------------------------------------------- queries


@pytest.fixture(scope="module")
def tok(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def maker(tok):
    return QueryMaker(tok, finder=CombinedFinder([DateFinder(), CapitalizedPhraseFinder()]))


def check_query(q, tok, query_length=96, max_masks=10):
    """Shapes, limits, and the masked tokens are exactly the span's wordpieces."""
    sp = QueryMaker(tok).special
    assert q.input_ids.shape == q.attention_mask.shape == (query_length,)
    assert q.mask_positions.shape == q.mask_targets.shape == q.mask_valid.shape == (max_masks,)
    n = int(q.attention_mask.sum())
    assert q.attention_mask[:n].all() and not q.attention_mask[n:].any()
    assert q.input_ids[0] == sp.cls and q.input_ids[n - 1] == sp.sep
    assert (q.input_ids[n:] == sp.pad).all()
    k = int(q.mask_valid.sum())
    assert 1 <= k <= max_masks and q.mask_valid[:k].all()
    pos = q.mask_positions[:k]
    assert np.array_equal(pos, np.arange(pos[0], pos[0] + k)) and 0 < pos[0] and pos[-1] < n - 1
    assert (q.input_ids[pos] == sp.mask).all() and (q.input_ids == sp.mask).sum() == k
    enc = tok.encode_batch([q.sentence])[0]
    offs = np.asarray(enc.offsets)
    covered = np.flatnonzero((offs[:, 0] < q.span.end) & (offs[:, 1] > q.span.start))
    assert q.mask_targets[:k].tolist() == [enc.ids[i] for i in covered]
    # The unmasked query tokens are a contiguous piece of the sentence's tokens.
    window = q.input_ids[1:n - 1].copy()
    window[pos - 1] = q.mask_targets[:k]
    ids = list(enc.ids)
    starts = [i for i in range(len(ids) - len(window) + 1)
              if ids[i:i + len(window)] == window.tolist()]
    assert starts, "query window is not a piece of the sentence"


def test_queries_on_tricky_sentences(maker, tok):
    text = ("Albert Einstein was born on 14 March 1879 in Ulm. It rained all day. "
            "The Grand Duchy Of The Very Long And Complicated Named Principality Of "
            "Saxe Coburg Gotha Altenburg existed. X.")
    skipped = collections.Counter()
    queries = maker.from_text(text, seed=3, skipped=skipped)
    assert len(queries) == 1 and queries[0].span_text in (
        "Albert Einstein", "14 March 1879", "Ulm")
    check_query(queries[0], tok)
    assert skipped == {"no_salient_span": 2, "span_too_long": 1}
    # Every span of the first sentence gets picked for some seed.
    picked = {maker.from_text(text, seed=s)[0].span_text for s in range(30)}
    assert picked == {"Albert Einstein", "14 March 1879", "Ulm"}


def test_long_sentence_window_around_the_span(tok):
    filler = " ".join(["the river flows past the old mill"] * 30)       # ~210 wordpieces
    text = f"{filler} until 4 July 1776 when {filler}."
    maker = QueryMaker(tok, finder=DateFinder())
    (q,) = maker.from_text(text)
    check_query(q, tok)
    assert int(q.attention_mask.sum()) >= 90 and q.span_text == "4 July 1776"
    middle = (q.mask_positions[0] + q.mask_positions[q.mask_valid.sum() - 1]) / 2
    assert 35 < middle < 60                                  # centred in the window
    decoded = tok.backend.decode(q.input_ids[1:3].tolist())
    assert decoded.split()[0] in "the river flows past the old mill".split()  # whole words
    # Without windowing the sentence keeps its start and the far mask is cut off.
    skipped = collections.Counter()
    assert QueryMaker(tok, finder=DateFinder(), window=False).from_text(
        text, skipped=skipped) == []
    assert skipped == {"mask_cut_off": 1}
    early = f"In 1776 {filler}."
    (q,) = QueryMaker(tok, finder=DateFinder(), window=False).from_text(early)
    check_query(q, tok)


def test_mask_and_query_limits_with_smaller_settings(tok):
    maker = QueryMaker(tok, finder=CapitalizedPhraseFinder(), query_length=16, max_mask_tokens=3)
    text = ("We met Marcel Grossmann and the Kingdom of Württemberg Royal Guard near a tall "
            "tree by the lake in Ulm on the way back from a long and tiring journey.")
    skipped = collections.Counter()
    queries = [q for s in range(10) for q in maker.from_text(text, seed=s, skipped=skipped)]
    assert queries and {q.span_text for q in queries} <= {"Marcel Grossmann", "Ulm"}
    for q in queries:
        check_query(q, tok, query_length=16, max_masks=3)
    with pytest.raises(ValueError, match="max_mask_tokens"):
        QueryMaker(tok, query_length=8, max_mask_tokens=10)


def test_pre_annotated_spans_are_honoured(tok):
    text = "The committee met in the old town hall and approved the budget."
    start = text.index("old town hall")
    spans = parse_span_annotations([[start, start + len("old town hall"), "FAC"]], text)
    maker = QueryMaker(tok, finder=None, anchors="all")
    (q,) = maker.from_text(text, spans)
    assert q.span_text == "old town hall" and q.span.label == "ANNOTATED"
    check_query(q, tok)
    assert QueryMaker(tok, finder=None, anchors="entities").from_text(text, spans) == []


# ----------------------------------------------------------------------------- Wikipedia


@pytest.fixture(scope="module")
def wiki_store(wiki_sample_path, minilm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("wiki") / "store"
    prepare_corpus(wiki_sample_path, out, tokenizer=minilm_path, max_documents=4,
                   progress=False)
    with BlockStore.open(out) as store:
        yield store


def test_wikipedia_queries_mask_anchors_or_dates(wiki_store, tok):
    maker = QueryMaker.for_store(wiki_store, tok)
    skipped = collections.Counter()
    queries = list(maker.iter_store(wiki_store, seed=0, skipped=skipped))
    assert len(queries) > 200
    labels = collections.Counter(q.span.label for q in queries)
    assert set(labels) == {"ANCHOR", "DATE"} and min(labels.values()) > 20
    by_block = collections.defaultdict(list)
    for q in queries:
        by_block[q.block_id].append(q)
    for block_id, qs in by_block.items():
        r = wiki_store.record(block_id)
        anchors = {(s.start, s.end) for s in r.spans}
        for q in qs:
            check_query(q, tok)
            start = r.text.index(q.sentence)
            where = (start + q.span.start, start + q.span.end)
            assert q.doc_index == r.doc_index and q.doc_id == r.doc_id
            if q.span.label == "ANCHOR":
                assert where in anchors
            else:
                assert [(s.start, s.end) for s in DateFinder()(q.sentence)].count(
                    (q.span.start, q.span.end)) == 1
    # Every sentence either gives a query or is counted by reason.
    sentences = sum(len(maker.salient_spans(wiki_store.text(i), wiki_store.spans(i))[0])
                    for i in range(len(wiki_store)))
    assert set(skipped) <= set(SKIP_REASONS) and skipped["no_salient_span"] > 0
    assert sum(skipped.values()) + len(queries) == sentences
    # Determinism: same seed, same queries; another seed picks other spans somewhere.
    again = list(maker.iter_store(wiki_store, seed=0))
    assert [(q.block_id, q.sentence, q.span) for q in again] == [
        (q.block_id, q.sentence, q.span) for q in queries]
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(again, queries))
    other = list(maker.iter_store(wiki_store, seed=1))
    assert [q.span for q in other] != [q.span for q in queries]
    single = maker.from_block(wiki_store, queries[-1].block_id, seed=0)
    assert single[-1].span == queries[-1].span

    # A batch, and the source document excluded from (fake) retrieved candidates.
    batch = collate_queries(queries[:8])
    assert batch["input_ids"].shape == (8, 96) and batch["mask_valid"].shape == (8, 10)
    retrieved = np.tile(np.arange(len(wiki_store)), (8, 1))
    cand, valid = exclude_source(retrieved, wiki_store.doc_index[retrieved], batch["doc_index"], 4)
    assert (cand[:, 0] == -1).all() and valid.all()
    assert (wiki_store.doc_index[cand[:, 1:]] != batch["doc_index"][:, None]).all()
    tokens, lengths = candidate_tokens(wiki_store, cand, max_length=288)
    assert tokens.shape == (8, 4, 288) and (lengths[:, 0] == 0).all() and (lengths[:, 1:] > 0).all()
    np.testing.assert_array_equal(tokens[0, 1, :lengths[0, 1]], wiki_store.tokens(cand[0, 1]))
