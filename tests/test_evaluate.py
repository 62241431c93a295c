"""Open-QA evaluation: SQuAD normalization, exact/regex match, answer-in-passage, recall@k,
predictions (pure Python)."""

from __future__ import annotations

import json
import re
import string

import numpy as np
import pytest

from realm_jax.data.qa import QAExample
from realm_jax.evaluate import (Prediction, answer_matches, answer_spans, answer_tokens,
                                exact_match, format_summary, has_answer, normalize_answer,
                                read_predictions, recall_at_k, regex_match, summarize,
                                write_predictions)


def squad_v11_rules(s: str) -> str:
    """The SQuAD v1.1 script's four steps, written out independently (no Unicode step)."""
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


NORMALIZE_CASES = [
    # articles: whole words only, anywhere
    ("The Beatles", "beatles"),
    ("  A  man, a plan, a canal: Panama! ", "man plan canal panama"),
    ("An", ""),
    ("Theater of the Absurd", "theater of absurd"),
    ("Anthem", "anthem"),
    ("the-the", "thethe"),                # punctuation goes first and joins the words
    ("A-ha", "aha"),
    ("the_end", "theend"),                # "_" is punctuation too
    # punctuation: ASCII only, removed without a space
    ("U.S.", "us"),
    ("New-York", "newyork"),
    ("rock'n'roll", "rocknroll"),
    ("$1,000.50", "100050"),
    ("a.k.a.", "aka"),
    ("(1879)", "1879"),
    # case and whitespace
    ("ALBERT\tEinstein\n", "albert einstein"),
    ("x\u00a0y", "x y"),                  # no-break space is whitespace
    # non-ASCII punctuation is kept, as in SQuAD
    ("\u201cQuoted\u201d", "\u201cquoted\u201d"),
    ("1879\u20131955", "1879\u20131955"),
]

UNICODE_CASES = [
    ("Caf\u00e9", "caf\u00e9"),           # composed
    ("Cafe\u0301", "caf\u00e9"),          # decomposed: the same after NFKC
    ("th\u00e9", "th\u00e9"),             # not an article (NFD + \b would drop "the")
    ("the\u0301 dansant", "th\u00e9 dansant"),
    ("\uff11\uff18\uff17\uff19", "1879"),  # full-width digits
    ("\ufb01nal", "final"),               # ligature
    ("km\u00b2", "km2"),                  # superscript
    ("wait\u2026", "wait"),               # ellipsis -> "..." -> removed
    ("what\u037e", "what"),               # Greek question mark -> ";" -> removed
    ("\u00c0N", "\u00e0n"),               # not an article
    ("Stra\u00dfe", "stra\u00dfe"),       # lower(), not casefold()
]


@pytest.mark.parametrize("text,expected", NORMALIZE_CASES)
def test_normalize_answer_squad_rules(text, expected):
    assert normalize_answer(text) == expected
    assert squad_v11_rules(text) == expected  # the table itself follows the SQuAD script


@pytest.mark.parametrize("text,expected", UNICODE_CASES)
def test_normalize_answer_unicode(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_agrees_with_squad_on_ascii():
    rng = np.random.default_rng(0)
    alphabet = list("aAnNtThHeE .,'-_$()\t") + ["the ", "an ", "a ", " The", "A."]
    for _ in range(500):
        s = "".join(rng.choice(alphabet, size=int(rng.integers(0, 12))))
        assert normalize_answer(s) == squad_v11_rules(s), repr(s)


@pytest.mark.parametrize("prediction,answers,expected", [
    ("the Beatles", ["Beatles"], True),
    ("Beatles", "The Beatles!", True),
    ("beetles", ["Beatles", "The Fab Four"], False),
    ("fab four", ["Beatles", "The Fab Four"], True),
    ("1,879", ["1879"], True),
    ("Caf\u00e9", ["Cafe"], False),       # accents count
    ("Cafe\u0301", ["Caf\u00e9"], True),
    ("New York", ["New-York"], False),    # "new york" vs "newyork"
    ("Einstein", [], False),
])
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) is expected


FEET = r"\d+ (feet|ft)"


@pytest.mark.parametrize("prediction,patterns,expected", [
    ("29 feet", FEET, True),
    ("29 FT", FEET, True),                 # IGNORECASE
    ("29 feet tall", FEET, True),          # re.match: not anchored at the end
    ("about 29 feet", FEET, False),        # ... but anchored at the start
    ("twenty-nine feet", FEET, False),
    ("Sun Yat-sen", r"Sun Yat-?sen|Sun Yixian", True),
    ("sun yatsen", r"Sun Yat-?sen|Sun Yixian", True),
    ("Sun Yixian", r"Sun Yat-?sen|Sun Yixian", True),
    ("hotdog", r"cat|dog", False),         # alternatives are tried at the start only
    ("dog food", [r"cat", r"dog"], True),  # any pattern
    ("nasa", r"[A-Z]{4}", True),
    ("Caf\u00e9", r"caf\u00e9", True),
])
def test_regex_match_curated_trec(prediction, patterns, expected):
    assert regex_match(prediction, patterns) is expected


def test_invalid_regex_raises_naming_it():
    with pytest.raises(ValueError, match=r"invalid answer regular expression '\(unclosed'"):
        regex_match("x", "(unclosed")


def test_answer_matches_chooses_by_is_regex():
    literal = QAExample("1", "How tall?", (FEET,))
    pattern = QAExample("2", "How tall?", (FEET,), is_regex=True)
    assert answer_matches("29 ft", pattern) and not answer_matches("29 ft", literal)
    assert answer_matches("\\d+ (feet|ft)", literal)


@pytest.mark.parametrize("passage,answers,expected", [
    ("He was born in 18790 BC.", ["1879"], False),     # token boundary
    ("He was born in 1879.", ["1879"], True),
    ("He was born in 1879-03-14.", ["1879"], True),
    ("Einstein's theory", ["Einstein"], True),
    ("Einsteinium is an element", ["Einstein"], False),
    ("a Beatles song", ["The Beatles"], True),          # articles dropped on both sides
    ("the U.S. Army", ["U.S."], True),
    ("the USA", ["US"], False),
    ("New-York City", ["New York"], True),              # punctuation separates tokens here
    ("Newyork", ["New York"], False),
    ("Le Cafe\u0301 de Flore", ["caf\u00e9 de flore"], True),
    ("\uff11\uff18\uff17\uff19 was a year", ["1879"], True),
    ("the cat", ["the", "..."], False),                 # nothing left of these answers
    ("Paris, France", ["London", "paris"], True),
])
def test_has_answer_tokens(passage, answers, expected):
    assert has_answer(passage, answers) is expected


@pytest.mark.parametrize("passage,pattern,expected", [
    ("The tower is 29 feet tall.", FEET, True),        # search, anywhere
    ("The tower is twenty feet tall.", FEET, False),
    ("Founded by SUN YAT-SEN", r"Sun Yat-?sen", True),
])
def test_has_answer_regex(passage, pattern, expected):
    assert has_answer(passage, [pattern], regex=True) is expected


def test_answer_spans_are_exact_matches():
    passage = ("The Beatles were an English rock band. In 1964 the Beatles, then U.S. stars, "
               "played in New-York and Washington, D.C. on their tour.")
    for answer in ["the Beatles", "1964", "U.S.", "Washington, D.C.", "English rock band"]:
        spans = answer_spans(passage, answer)
        assert spans, answer
        for s, e in spans:
            assert exact_match(passage[s:e], [answer]), (answer, passage[s:e])
    second = passage.index("Beatles", 12)
    assert answer_spans(passage, "The Beatles") == [(4, 11), (second, second + 7)]
    assert answer_spans(passage, "Beatles tour") == []
    year = passage.index("1964")
    assert answer_spans(passage, r"\d{4}", regex=True) == [(year, year + 4)]


def test_answer_tokens_offsets_and_expansions():
    tokens = answer_tokens("\u00bd of Einstein's foo_bar")
    assert [t for t, _, _ in tokens] == ["1", "\u2044", "2", "of", "einstein", "s", "foo",
                                         "bar"]
    assert tokens[0][1:] == (0, 1) and tokens[4][1:] == (5, 13)


def test_recall_at_k_hand_example():
    hits = [[False, True, False], [False, False, False], [True], [False] * 4 + [True]]
    assert recall_at_k(hits, ks=(1, 2, 5, 100)) == {1: 0.25, 2: 0.5, 5: 0.75, 100: 0.75}
    with pytest.raises(ValueError, match="at least one question"):
        recall_at_k([])
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k(hits, ks=(0,))


def _predictions() -> list[Prediction]:
    einstein = QAExample("q1", "Who developed relativity?", ("Albert Einstein", "Einstein"),
                         gold_passages=("Relativity",))
    trec = QAExample("q2", "How tall is the tower?", (FEET,), is_regex=True)
    paris = QAExample("q3", "Capital of France?", ("Paris",), gold_passages=("France", "7"))
    return [
        Prediction.from_retrieval(einstein, "Einstein", ids=np.array([3, 9]),
                                  titles=["Physics", "Relativity"],
                                  texts=["Newton and Einstein.", "Relativity is a theory."],
                                  scores=np.array([2.5, 1.0], np.float32)),
        Prediction.from_retrieval(trec, "about 30 feet", ids=[1, 2], titles=["A", "B"],
                                  texts=["It is 30 feet tall.", "No height."],
                                  scores=[0.3, 0.2], keep_text=True),
        Prediction.from_retrieval(paris, "Lyon", ids=[5, 7], titles=["Lyon", "Marseille"],
                                  texts=["Lyon is a city.", "Paris is far."], scores=[1, 0]),
    ]


def test_prediction_flags():
    p1, p2, p3 = _predictions()
    assert p1.correct and [q.has_answer for q in p1.passages] == [True, False]
    assert [q.is_gold for q in p1.passages] == [False, True]
    assert p1.passages[0].id == 3 and type(p1.passages[0].id) is int
    assert type(p1.passages[0].score) is float and p1.passages[0].text is None
    assert not p2.correct and p2.passages[0].has_answer  # re.match vs search
    assert p2.passages[0].text == "It is 30 feet tall."
    assert p3.passages[1].is_gold and p3.passages[1].has_answer and not p3.correct
    retrieval_only = Prediction.from_retrieval(QAExample("q", "?", ("x",)), None, ids=[],
                                               titles=[], texts=[], scores=[])
    assert retrieval_only.correct is None
    with pytest.raises(ValueError, match="differ in length"):
        Prediction.from_retrieval(QAExample("q", "?", ("x",)), "x", ids=[1], titles=[],
                                  texts=[], scores=[])


def test_summarize_and_format():
    summary = summarize(_predictions(), ks=(1, 2, 20))
    assert summary == pytest.approx({
        "count": 3, "answered": 3, "exact_match": 1 / 3,
        "recall@1": 2 / 3, "recall@2": 1.0,       # k=20 > 2 passages: left out
        "gold_count": 2, "gold_recall@1": 0.0, "gold_recall@2": 1.0})
    table = format_summary(summary)
    assert table.splitlines() == [
        "| questions | EM | R@1 | R@2 | gold R@1 (n=2) | gold R@2 (n=2) |",
        "|---:|---:|---:|---:|---:|---:|",
        "| 3 | 33.3 | 66.7 | 100.0 | 0.0 | 100.0 |"]
    json.dumps(summary)
    with pytest.raises(ValueError, match="no predictions"):
        summarize([])


def test_write_predictions_atomic_round_trip(tmp_path):
    path = tmp_path / "out" / "predictions.jsonl"
    preds = _predictions()
    assert write_predictions(path, preds) == path
    assert read_predictions(path) == preds
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and "text" not in json.loads(lines[0])["passages"][0]

    def failing():
        yield preds[0]
        raise RuntimeError("reader crashed")

    with pytest.raises(RuntimeError):
        write_predictions(path, failing())
    assert read_predictions(path) == preds                     # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.jsonl"]


def test_evaluate_imports_nothing_from_data():
    """realm_jax.data imports realm_jax.evaluate (answer rules), so not the other way round,
    not even for type checking."""
    import ast
    import inspect

    from realm_jax import evaluate

    tree = ast.parse(inspect.getsource(evaluate))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m and m.startswith("realm_jax.data")]
    assert all(a.name != "data" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and n.module == "realm_jax" for a in n.names)
