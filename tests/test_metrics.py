"""Generation, classification and provenance metrics (token F1, BLEU-1, ROUGE-L, Q-BLEU-1,
label accuracy, distinct n-grams, KILT R-precision and recall@k) and `realm-jax score`: hand-
computed values and the reference libraries, on the subtle cases (several references, empty
predictions, repeated n-grams, punctuation and articles)."""

from __future__ import annotations

import json
import math
import re

import pytest

from realm_jax import cli
from realm_jax import evaluate as ev
from realm_jax.data.qa import QAExample


# ----------------------------------------------------------------------------- token F1


@pytest.mark.parametrize("prediction,answers,expected", [
    ("the cat sat", ["a cat sat down"], 0.8),          # articles dropped: P 2/2, R 2/3
    ("Cat, sat!", ["cat sat"], 1.0),                   # punctuation dropped
    ("U.S. army", ["US Army"], 1.0),                   # punctuation joins, as in EM
    ("cat cat cat", ["cat"], 0.5),                     # repeats clipped: P 1/3, R 1
    ("cat dog", ["cat cat dog"], 0.8),                 # P 2/2, R 2/3
    ("Paris", ["Lyon", "paris France", "Paris"], 1.0),  # the best reference
    ("Paris", ["Lyon", "paris France"], 2 / 3),
    ("", ["Paris"], 0.0),                              # empty prediction
    ("the", ["a"], 1.0),                               # both empty after normalization
    ("the", ["Paris"], 0.0),
])
def test_token_f1(prediction, answers, expected):
    assert ev.token_f1(prediction, answers) == pytest.approx(expected)


# ----------------------------------------------------------------------------- BLEU-1


def test_generation_tokens_keep_punctuation_and_articles():
    assert ev.generation_tokens("The cat's hat, 1879-1955.") == [
        "the", "cat", "'", "s", "hat", ",", "1879", "-", "1955", "."]
    assert ev.generation_tokens("Ｃａｆé") == ["café"]
    assert ev.generation_tokens("   ") == []


def test_bleu1_hand_computed():
    # all 3 tokens match; reference lengths 4 (closest to 3) and 2 (closest to 0): r=6, c=3
    assert ev.bleu1(["the cat sat", ""], [["the cat sat on"], "x y"]) == \
        pytest.approx(math.exp(1 - 6 / 3))
    # repeats clipped at the count in the best reference: "the" x3 vs refs with 1 and 2
    assert ev.bleu1(["the the the"], [["the cat", "the the"]]) == pytest.approx(2 / 3)
    # punctuation is a token: 2 of 3 tokens match, and the prediction is longer: no penalty
    assert ev.bleu1(["The cat."], [["the cat"]]) == pytest.approx(2 / 3)
    assert ev.bleu1([""], [["x"]]) == 0.0
    with pytest.raises(ValueError, match="no reference"):
        ev.bleu1(["a"], [[]])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        ev.bleu1(["a", "b"], [["a"]])


def test_bleu1_matches_nltk_corpus_bleu():
    """(nltk counts an empty prediction as one token: the empty case is checked above.)"""
    from nltk.translate.bleu_score import corpus_bleu
    predictions = ["the cat sat on the mat", "a dog , a dog", "here x here",
                   "Paris is the capital"]
    references = [["the cat is on the mat", "there is a cat on the mat"],
                  ["the dog barked"],
                  ["nothing here", "x"],
                  ["paris", "the capital of france is paris", "it is paris"]]
    want = corpus_bleu([[ev.generation_tokens(r) for r in refs] for refs in references],
                       [ev.generation_tokens(p) for p in predictions], weights=(1.0,))
    assert ev.bleu1(predictions, references) == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_computed():
    # vs "the cat": LCS 2, P 2/3, R 1; vs "cat sat on the mat": LCS 2, P 2/3, R 2/5
    p, r, b2 = 2 / 3, 1.0, 1.2 ** 2
    assert ev.rouge_l("the cat sat", ["the cat", "cat sat on the mat"]) == \
        pytest.approx((1 + b2) * p * r / (r + b2 * p))
    # best precision and best recall may come from different references
    p, r = 1.0, 1.0 / 2
    assert ev.rouge_l("a b", ["a x b y", "a c d b e f g h"], beta=1.0) == \
        pytest.approx(2 * p * r / (p + r))
    # punctuation is a token: "cat , sat" vs "cat sat": P 2/3, R 1
    assert ev.rouge_l("cat, sat", "cat sat", beta=1.0) == pytest.approx(0.8)
    # repeated tokens: the subsequence uses each once
    assert ev.rouge_l("a a a", "a", beta=1.0) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert ev.rouge_l("", ["the cat"]) == 0.0
    assert ev.rouge_l("dog", ["the cat"]) == 0.0


def test_rouge_l_one_reference_is_rouge_score_f_measure():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for pred, ref in [("the quick brown fox jumps", "a quick brown dog jumps over the fox"),
                      ("police killed the gunman", "the gunman police killed"),
                      ("one two three", "three two one")]:
        assert ev.rouge_l(pred, [ref], beta=1.0) == pytest.approx(
            scorer.score(ref, pred)["rougeL"].fmeasure)


# ----------------------------------------------------------------------------- Q-BLEU-1


def test_question_word_types():
    assert ev.question_word_types("Which Italian astronomer, under arrest, backed Copernicus?") \
        == {"entities": ["copernicus"], "question_words": ["which", "italian"],
            "content_words": ["astronomer", "arrest", "backed"],
            "function_words": ["under"]}
    # a Jeopardy clue: no question word; "This" is a function word, not an entity
    assert ev.question_word_types("This 1925 novel by F. Scott Fitzgerald") == {
        "entities": ["f", "scott", "fitzgerald"], "question_words": [],
        "content_words": ["1925", "novel"], "function_words": ["this", "by"]}


def test_qbleu1_hand_computed():
    pred, ref = "Who wrote Hamlet?", "Who wrote the play Hamlet?"
    # types: entities hamlet/hamlet, question who/who, content wrote/wrote+play, function -/the
    precision = 0.6 * 1 + 0.2 * 1 + 0.1 * 1 + 0.1 * 0
    recall = 0.6 * 1 + 0.2 * 1 + 0.1 * 0.5 + 0.1 * 0
    answerability = 2 * precision * recall / (precision + recall)
    bleu = math.exp(1 - 5 / 3)                          # 3 words all match, reference has 5
    want = 0.7 * answerability + 0.3 * bleu
    assert ev.qbleu1(pred, ref) == pytest.approx(want)
    # the best reference counts
    assert ev.qbleu1(pred, ["What is a sonnet?", ref]) == pytest.approx(want)
    assert ev.qbleu1(ref, ref) == pytest.approx(1.0)


def test_qbleu1_weights_entities_and_skips_absent_types():
    ref = "This Danish prince speaks to a skull"
    wrong_entity = ev.qbleu1("This Swedish prince speaks to a skull", ref)
    wrong_content = ev.qbleu1("This Danish king speaks to a skull", ref)
    assert wrong_entity < wrong_content < 1.0
    # only content words, none shared: no credit from the types neither question has
    assert ev.qbleu1("x y z", "a b c") == 0.0
    assert ev.qbleu1("", ref) == 0.0 and ev.qbleu1("?!", ref) == 0.0
    # a clue without question words can still score 1
    assert ev.qbleu1("This danish prince speaks to a skull", ref) < 1.0   # not an entity
    assert ev.qbleu1(ref + ".", ref) == pytest.approx(1.0)          # punctuation ignored
    # weights of one type only: a pair without it has nothing to miss (BLEU-1 decides)
    only_entities = {"entities": 1.0, "question_words": 0.0, "content_words": 0.0,
                     "function_words": 0.0}
    assert ev.qbleu1("a b", "a b c d", weights=only_entities) == pytest.approx(
        0.7 + 0.3 * math.exp(1 - 4 / 2))
    with pytest.raises(ValueError, match="summing to 1"):
        ev.qbleu1("a", "a", weights={"entities": 1.0})


# ----------------------------------------------------------------------------- accuracy, distinct


def test_label_accuracy():
    assert ev.label_accuracy(["Supports.", "refutes", "maybe", "not enough info"],
                             ["SUPPORTS", "SUPPORTS", "REFUTES", ["NOT ENOUGH INFO"]]) == 0.5
    with pytest.raises(ValueError, match="as many labels"):
        ev.label_accuracy(["a"], [])


def test_distinct_ngrams():
    # tri-grams: abc bca cab abc | abc -> 3 distinct of 5 (repeats inside and across)
    assert ev.distinct_ngrams(["a b c a b c", "A b c"]) == pytest.approx(3 / 5)
    # none spans two generations
    assert ev.distinct_ngrams(["a b", "c d"]) == 0.0
    assert ev.distinct_ngrams(["a b", "c d"], n=2) == 1.0
    # punctuation is a token
    assert ev.distinct_ngrams(["a, b", "a b ."]) == 1.0
    assert ev.distinct_ngrams([]) == 0.0 and ev.distinct_ngrams([""]) == 0.0


# ----------------------------------------------------------------------------- KILT provenance


def test_kilt_r_precision():
    sets = [["B", "A"], ["C"]]
    assert ev.kilt_r_precision(["A", "B", "C"], sets) == 1.0       # first 2 hold set 0
    assert ev.kilt_r_precision(["A", "X", "B"], sets) == 0.5       # R=2: A of {A, B}
    assert ev.kilt_r_precision(["C", "X"], sets) == 1.0            # R=1 for {C}
    assert ev.kilt_r_precision(["A", "A", "B"], sets) == 1.0       # repeats collapse
    assert ev.kilt_r_precision([" 12 ", 7], [[12, "7"]]) == 1.0    # str(x).strip()
    assert ev.kilt_r_precision(["A"], []) == 0.0


def test_kilt_recall_at_k_ranks_evidence_sets_at_their_last_page():
    sets = [["B", "A"], ["C"]]
    # rank: A -> [s0]; X -> [s0, F]; B -> [F, T]; C -> [F, T, T]
    retrieved = ["A", "X", "B", "C"]
    assert [ev.kilt_recall_at_k(retrieved, sets, k) for k in (1, 2, 3, 4)] == \
        [0.0, 0.5, 1.0, 1.0]
    assert ev.kilt_recall_at_k(["C", "A"], sets, 5) == 0.5         # set 0 never complete
    assert ev.kilt_recall_at_k(["X", "C"], [["C"], ["C"]], 2) == 1.0  # duplicate sets: one
    assert ev.kilt_recall_at_k(["X"], [], 1) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        ev.kilt_recall_at_k([], sets, 0)


# ----------------------------------------------------------------------------- scoring a file


def _eval_predictions(tmp_path):
    """A predictions file as `realm-jax eval` writes it."""
    examples = [QAExample("q1", "Who wrote Hamlet?", ("William Shakespeare", "Shakespeare"),
                          gold_passages=("Hamlet",)),
                QAExample("q2", "Capital of France?", ("Paris",), gold_passages=("France",))]
    predictions = [
        ev.Prediction.from_retrieval(examples[0], "Shakespeare", ids=[1, 2],
                                     titles=["Hamlet", "Macbeth"], texts=["", ""],
                                     scores=[2.0, 1.0]),
        ev.Prediction.from_retrieval(examples[1], "the city of Paris", ids=[3, 4],
                                     titles=["Lyon", "France"], texts=["", ""],
                                     scores=[2.0, 1.0])]
    return ev.write_predictions(tmp_path / "predictions.jsonl", predictions), predictions


def test_score_file_reads_eval_predictions(tmp_path):
    path, predictions = _eval_predictions(tmp_path)
    got = ev.score_file(path, "em,f1,distinct3,rprec,recall@2")
    assert got["count"] == 2
    assert got["em"] == ev.summarize(predictions)["exact_match"] == 0.5
    assert got["f1"] == pytest.approx((1.0 + 0.5) / 2)   # "city of paris" vs "paris": 2/4
    assert got["distinct3"] == 1.0                       # "the city of", "city of paris"
    assert got["rprec"] == 0.5 and got["recall@2"] == 1.0 and got["provenance_count"] == 2


def test_eval_predictions_keep_evidence_sets(tmp_path):
    """A task example's evidence sets travel through the predictions file to rprec and
    recall@k (a set of two pages counts once both are retrieved)."""
    from realm_jax.data.tasks import TaskExample
    example = TaskExample("f1", "Hamlet is by a Danish author.", ("refutes",),
                          gold_passages=("Hamlet", "Shakespeare"),
                          provenance=(("Hamlet", "Shakespeare"),), label="REFUTES")
    prediction = ev.Prediction.from_retrieval(
        example, "refutes", ids=[1, 2, 3], titles=["Hamlet", "Denmark", "Shakespeare"],
        texts=["", "", ""], scores=[3.0, 2.0, 1.0])
    assert prediction.provenance == (("Hamlet", "Shakespeare"),)
    path = ev.write_predictions(tmp_path / "p.jsonl", [prediction])
    assert ev.read_predictions(path) == [prediction]
    # KILT's rank: [Denmark, the set {Hamlet, Shakespeare}], the set complete at place 2
    got = ev.score_file(path, "accuracy,rprec,recall@1,recall@2")
    assert got == {"count": 1, "accuracy": 1.0, "provenance_count": 1, "rprec": 0.5,
                   "recall@1": 0.0, "recall@2": 1.0}
    # without provenance, each gold passage is an evidence set of its own
    plain = ev.Prediction.from_retrieval(QAExample("q", "?", ("x",), gold_passages=("Denmark",)),
                                         "x", ids=[1, 2], titles=["Hamlet", "Denmark"],
                                         texts=["", ""], scores=[1.0, 0.0])
    assert "provenance" not in plain.to_json()
    path = ev.write_predictions(tmp_path / "q.jsonl", [plain])
    assert ev.score_file(path, "rprec,recall@2") == {
        "count": 1, "provenance_count": 1, "rprec": 0.0, "recall@2": 1.0}


def test_score_file_fields_and_errors(tmp_path):
    path = tmp_path / "gen.jsonl"
    lines = [{"question": "Hamlet", "prediction": "Who wrote Hamlet?",
              "answers": ["Who wrote the play Hamlet?"],
              "provenance": [["Hamlet"], ["Shakespeare", "Hamlet"]]},
             {"question": "x", "prediction": "29 feet tall", "answers": [r"\d+ feet"],
              "is_regex": True}]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    got = ev.score_file(path, ["em", "qbleu1", "bleu1", "rougeL", "accuracy"])
    assert got["em"] == 0.5                                   # the regex line matches
    assert got["qbleu1"] == pytest.approx(
        (ev.qbleu1("Who wrote Hamlet?", "Who wrote the play Hamlet?")
         + ev.qbleu1("29 feet tall", r"\d+ feet")) / 2)
    assert set(got) == {"count", "em", "qbleu1", "bleu1", "rougeL", "accuracy"}

    bad = [('{"question": "q", "answers": ["a"]}', ":1: field 'prediction' (or 'answer')"),
           ('{"question": "q", "prediction": "p"}', "field 'answers' (or 'gold_answers')"),
           ('{"question": "q", "answer": null, "answers": ["a"]}', "only retrieval"),
           ('{"question": "q", "prediction": "p", "answers": []}', "field 'answers': empty"),
           ('{"question": "q", "prediction": "p", "answers": [1.5]}', "list of strings"),
           ('{"question": 3, "prediction": "p", "answers": ["a"]}', "field 'question'"),
           ('{"question": "q", "prediction": "p", "answers": "a", "provenance": "X"}',
            "field 'provenance'"),
           ("[1, 2]", "expected a JSON object"),
           ("{oops", "invalid JSON")]
    for text, message in bad:
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            ev.read_scored_examples(path)
        assert str(e.value).startswith(f"{path}:1: ")
    path.write_text('{"question": "q", "prediction": "p", "answers": "a"}\n')
    with pytest.raises(ValueError, match="rprec needs gold provenance"):
        ev.score_file(path, "rprec")
    with pytest.raises(ValueError, match="unknown metric.*bleu4"):
        ev.parse_metrics("em,bleu4")
    assert ev.parse_metrics(" em, f1,em,distinct2,recall@10 ") == [
        "em", "f1", "distinct2", "recall@10"]


def test_score_command(tmp_path, capsys):
    path, _ = _eval_predictions(tmp_path)
    assert cli.main(["score", "--predictions", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"count": 2, "em": 0.5, "f1": 0.75}
    # a bad line: one error line naming the file, the line and the field; exit 2
    with open(path, "a") as f:
        f.write('{"question": "q", "prediction": "p"}\n')
    assert cli.main(["score", "--predictions", str(path), "--metrics", "em"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"realm-jax score: error: {path}:3: field 'answers' (or 'gold_answers'): "
                   "missing; expected a list of reference strings"]
    assert cli.main(["score", "--predictions", str(tmp_path / "nope.jsonl")]) == 2
    assert "predictions file not found" in capsys.readouterr().err
