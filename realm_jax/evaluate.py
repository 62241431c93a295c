"""Evaluation: open-domain QA (exact match, token F1, regex match, answer-in-passage,
recall@k), generation (BLEU-1, ROUGE-L, Q-BLEU-1, distinct n-grams), label accuracy (FEVER),
KILT provenance (R-precision, recall@k), and the scoring of a predictions file.

Pure Python (no JAX); imports nothing from `realm_jax.data` (which imports it). Each metric
is per example or per corpus, and scores several references, as its official script does (see
:func:`score` and each metric). BLEU-1, ROUGE-L and Q-BLEU-1 come from sacrebleu and
rouge-score (imported on first use); Q-BLEU's answerability, distinct-n and KILT's metrics
have no maintained library and are written here.

The QA rules, and where they come from:

- :func:`normalize_answer` is the SQuAD v1.1 script's normalization (lower case; drop the
  ASCII punctuation of ``string.punctuation``, joining what it separated, so "U.S." and
  "US" agree; drop the whole words "a", "an", "the"; collapse whitespace), after one
  Unicode step: NFKC. DPR and ORQA apply NFD first; NFKC is chosen instead because NFD
  leaves accents as separate combining marks, which Python's ``\\b`` treats as word
  boundaries (so "thé" would lose its "the"), and because compatibility folding makes
  full-width forms, ligatures and superscripts ("１８７９", "ﬁnal", "km²") agree with their
  plain spellings. Accents are kept: "Café" and "Cafe" differ, as in SQuAD. Non-ASCII
  punctuation (curly quotes, dashes) is kept, as in SQuAD, except what NFKC maps to ASCII.
- :func:`exact_match`: the normalized prediction equals some normalized answer.
- :func:`regex_match` (CuratedTrec): each pattern compiled with IGNORECASE | UNICODE |
  MULTILINE and tried with ``re.match`` on the prediction as given, as DrQA and ORQA do: the
  match is anchored at the start of the prediction but not at its end ("29 feet tall" matches
  ``\\d+ (feet|ft)``, "about 29 feet" does not). Unlike ORQA, which scores an invalid pattern
  as a miss, an invalid pattern raises (datasets are checked when read).
- :func:`has_answer` / :func:`answer_spans` (recall@k, and the trainer's "this candidate
  holds the answer"): DPR's token-level rule. Text is cut into tokens (runs of letters and
  digits, and every other non-space character alone), each token is normalized as above
  (NFKC, lower case) and punctuation tokens and articles are dropped; an answer is found
  where its tokens occur contiguously in the passage's tokens. So "1879" is not found in
  "18790", "Einstein" is found in "Einstein's", and "the Beatles" in "Beatles". The one
  difference from exact match: punctuation separates tokens here but joins words there, so
  "New-York" holds the tokens of "New York" although the two strings do not match exactly.
  Regex answers are searched (``re.search``) in the passage as given, as in DPR.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import string
import types
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from realm_jax.durable import atomic_write

DEFAULT_KS = (1, 5, 20, 100)
REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = frozenset(("a", "an", "the"))
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")
# A token: a run of letters/digits (with combining accents, for decomposed text), or any other
# single non-space character. Text is first cut into coarser runs (one character class, fast),
# which are normalized (cached) and cut into tokens.
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
_TOKEN_RE = re.compile(rf"(?:[^\W_]|[{_MARKS}])+|\S")
_RUN_RE = re.compile(rf"[\w{_MARKS}]+|\S")


def _unicode_lower(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalization after NFKC (see the module docstring)."""
    text = "".join(c for c in _unicode_lower(s) if c not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def _as_list(answers: str | Iterable[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Iterable[str]) -> bool:
    """True when the normalized prediction equals a normalized answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in _as_list(answers))


@functools.lru_cache(maxsize=65536)
def compile_regex(pattern: str) -> re.Pattern[str]:
    """A CuratedTrec answer pattern, compiled with :data:`REGEX_FLAGS` (cached); a clear
    ``ValueError`` for an invalid one."""
    try:
        return re.compile(pattern, REGEX_FLAGS)
    except re.error as e:
        raise ValueError(f"invalid answer regular expression {pattern!r}: {e}") from None


def regex_match(prediction: str, patterns: str | Iterable[str]) -> bool:
    """True when a pattern matches at the start of the prediction (``re.match``)."""
    return any(compile_regex(p).match(prediction) is not None for p in _as_list(patterns))


class AnswerKey(Protocol):
    """What scoring reads of an example (`realm_jax.data.qa.QAExample` has it)."""

    @property
    def qid(self) -> str: ...
    @property
    def question(self) -> str: ...
    @property
    def answers(self) -> Sequence[str]: ...
    @property
    def is_regex(self) -> bool: ...
    @property
    def gold_passages(self) -> Sequence[str]: ...


def answer_matches(prediction: str, example: AnswerKey) -> bool:
    """Regex match for regex examples (CuratedTrec), exact match otherwise."""
    match = regex_match if example.is_regex else exact_match
    return match(prediction, example.answers)


# ----------------------------------------------------------------------------- answer in text


@functools.lru_cache(maxsize=1 << 18)
def _run_tokens(run: str) -> tuple[str, ...]:
    """The normalized tokens of one run of :data:`_RUN_RE`, punctuation and articles left
    out. NFKC may expand a character ("½" -> "1⁄2"), hence the cut after it; plain ASCII
    letters and digits (NFKC-stable) are only lower-cased."""
    if run.isascii() and run.isalnum():
        tokens: Iterable[str] = (run.lower(),)
    else:
        tokens = _TOKEN_RE.findall(_unicode_lower(run))
    return tuple(t for t in tokens if t not in _PUNCTUATION and t not in _ARTICLES)


def answer_tokens(text: str) -> list[tuple[str, int, int]]:
    """``(token, start, end)`` for the normalized tokens of ``text`` (see the module
    docstring), punctuation and articles left out; ``text[start:end]`` is the token's source
    (the whole of "foo_bar" for both of its tokens)."""
    return [(t, m.start(), m.end()) for m in _RUN_RE.finditer(text)
            for t in _run_tokens(m.group())]


def _words(text: str) -> list[str]:
    """The tokens of :func:`answer_tokens` without their offsets (faster)."""
    return [t for run in _RUN_RE.findall(text) for t in _run_tokens(run)]


@functools.lru_cache(maxsize=65536)
def _answer_words(answer: str) -> tuple[str, ...]:
    return tuple(_words(answer))


def _matches(words: list[str], answers: Iterable[str]) -> Iterator[tuple[int, int]]:
    """``(i, n)`` for every answer whose n tokens occur at ``words[i:i + n]``."""
    for answer in answers:
        want = _answer_words(answer)
        if not want:  # nothing left after normalization ("the", "...")
            continue
        i = -1
        while True:
            try:
                i = words.index(want[0], i + 1)
            except ValueError:
                break
            if tuple(words[i:i + len(want)]) == want:
                yield i, len(want)


def _regex_spans(text: str, patterns: Iterable[str]) -> Iterator[tuple[int, int]]:
    for pattern in patterns:
        for m in compile_regex(pattern).finditer(text):
            if m.end() > m.start():
                yield m.span()


def answer_spans(text: str, answers: str | Iterable[str], *, regex: bool = False
                 ) -> list[tuple[int, int]]:
    """Character ranges ``(start, end)`` of ``text`` where an answer occurs, sorted, without
    repeats: token matches (from the first matched token's start to the last one's end), or
    non-empty regex matches when ``regex``."""
    answers = _as_list(answers)
    if regex:
        return sorted(set(_regex_spans(text, answers)))
    tokens = answer_tokens(text)
    return sorted({(tokens[i][1], tokens[i + n - 1][2])
                   for i, n in _matches([t for t, _, _ in tokens], answers)})


def has_answer(passage_text: str, answers: str | Iterable[str], *, regex: bool = False) -> bool:
    """Whether the passage holds an answer (DPR's rule; see the module docstring). Only the
    text given is searched: prepend the title to count it, as DPR's ``use_title`` does."""
    answers = _as_list(answers)
    found = _regex_spans(passage_text, answers) if regex else _matches(_words(passage_text),
                                                                       answers)
    return next(found, None) is not None


# ----------------------------------------------------------------------------- recall


def recall_at_k(hits: Sequence[Sequence[bool]], ks: Iterable[int] = DEFAULT_KS
                ) -> dict[int, float]:
    """For each k, the fraction of questions with a hit among their first k passages.

    ``hits[q][i]`` says whether question q's i-th passage (best first) is a hit; a question
    with fewer than k passages counts what it has.
    """
    if not hits:
        raise ValueError("recall_at_k needs at least one question")
    ks = list(ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {ks}")
    first = [next((i for i, h in enumerate(row) if h), None) for row in hits]
    return {k: sum(f is not None and f < k for f in first) / len(hits) for k in ks}


# ----------------------------------------------------------------------------- generation metrics


def _best(scores: Iterable[float]) -> float:
    return max(scores, default=0.0)


def _overlap(a: Sequence[str], b: Sequence[str]) -> int:
    """Tokens in common, with repeats clipped (a token twice in ``a`` and once in ``b``
    counts once)."""
    return sum((collections.Counter(a) & collections.Counter(b)).values())


def _f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    if not pred or not gold:
        return float(not pred and not gold)
    same = _overlap(pred, gold)
    return 0.0 if same == 0 else 2 * same / (len(pred) + len(gold))


def token_f1(prediction: str, answers: str | Iterable[str]) -> float:
    """SQuAD's token F1, the best over the answers: precision and recall of the words of the
    normalized texts (:func:`normalize_answer`: no punctuation, no articles), repeats clipped.
    A side with no word left scores 1.0 against another empty side, else 0.0 (SQuAD 2.0's
    rule; v1.1 gave two empty texts 0 although exact match calls them equal)."""
    pred = normalize_answer(prediction).split()
    return _best(_f1(pred, normalize_answer(a).split()) for a in _as_list(answers))


def generation_tokens(text: str) -> list[str]:
    """The tokens BLEU-1, ROUGE-L and distinct-n count: NFKC, lower case, runs of letters
    and digits, and every other non-space character alone. Punctuation is a token and
    articles stay, as in the lower-cased spaCy tokens MS MARCO's official script scores."""
    return _TOKEN_RE.findall(_unicode_lower(text))


def _joined(text: str) -> str:
    return " ".join(generation_tokens(text))


@functools.lru_cache(maxsize=4)
def _bleu1_metric(sentence: bool):
    from sacrebleu.metrics import BLEU  # imported on first use
    if sentence:  # no smoothing: order 1 has no zero higher-order counts to smooth
        return BLEU(max_ngram_order=1, tokenize="none", smooth_method="none",
                    effective_order=True)
    return BLEU(max_ngram_order=1, tokenize="none")


def bleu1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus-level BLEU-1 in [0, 1], as MS MARCO's official script computes it (coco-caption's
    BLEU, corpus statistics): the clipped unigram matches of all predictions over their
    tokens, times the brevity penalty exp(1 - r / c) when the c predicted tokens are fewer
    than r, the sum of each prediction's closest reference length (the shorter on a tie). A
    token's matches are clipped at its count in the reference that has it most often.
    Computed by sacrebleu (``BLEU(max_ngram_order=1)``) on :func:`generation_tokens`, so
    punctuation counts as tokens and an empty prediction adds nothing but its references'
    length."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("bleu1 needs at least one prediction")
    refs = [_as_list(r) for r in references]
    if not all(refs):
        raise ValueError(f"prediction {next(i for i, r in enumerate(refs) if not r)} has no "
                         "reference")
    streams = [[_joined(r[i]) if i < len(r) else None for r in refs]
               for i in range(max(map(len, refs)))]
    return _bleu1_metric(False).corpus_score([_joined(p) for p in predictions],
                                             streams).score / 100


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use (it loads nltk)
    # its own tokenizer drops every character outside a-z0-9, non-Latin letters included
    return rouge_scorer.RougeScorer(["rougeL"],
                                    tokenizer=types.SimpleNamespace(tokenize=generation_tokens))


def rouge_l(prediction: str, references: str | Iterable[str], *, beta: float = 1.2) -> float:
    """Sentence-level ROUGE-L of one prediction as MS MARCO's official script (coco-caption's
    Rouge) computes it: for each reference the longest common subsequence of tokens
    (:func:`generation_tokens`) gives a precision LCS / len(prediction) and a recall LCS /
    len(reference) (rouge-score computes both); with P the best precision and R the best
    recall over the references, F = (1 + beta^2) P R / (R + beta^2 P), 0 when either is 0
    (an empty prediction). beta 1.2 as the script; with one reference and beta=1 this is
    rouge-score's F-measure. The corpus figure is the mean over predictions."""
    scorer = _rouge_scorer()
    scores = [scorer.score(r, prediction)["rougeL"] for r in _as_list(references)]
    p = max((s.precision for s in scores), default=0.0)
    r = max((s.recall for s in scores), default=0.0)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


# Q-BLEU-1's word types and weights. The weights are the reference implementation's example
# (github.com/PrekshaNema25/Answerability-Metric: --ner_weight 0.6 --qt_weight 0.2
# --re_weight 0.1, function words the rest, --delta 0.7); RAG describes its Q-BLEU-1 as the
# variant "with a higher weight for matching entities", which these are.
QBLEU_WEIGHTS = {"entities": 0.6, "question_words": 0.2, "content_words": 0.1,
                 "function_words": 0.1}
QBLEU_DELTA = 0.7
QUESTION_WORDS = frozenset("what which who whom whose where when why how".split())
FUNCTION_WORDS = frozenset("""
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his i if in into is
    it its itself just me more most my myself no nor not now of off on once only or other our
    ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we
    were while will with would you your yours yourself yourselves""".split())


def question_word_types(question: str) -> dict[str, list[str]]:
    """The words of a question by Q-BLEU type, lower-cased (punctuation dropped): question
    words (what, which, who, whom, whose, where, when, why, how, and the word after "what" or
    "which", which names the answer's type), function words (:data:`FUNCTION_WORDS`), entities
    (other words written with a capital: a named-entity tagger's stand-in, as in the
    reference implementation) and content words (the rest, numbers included)."""
    words = [w for w in _TOKEN_RE.findall(unicodedata.normalize("NFKC", question))
             if w[0].isalnum()]
    out: dict[str, list[str]] = {name: [] for name in QBLEU_WEIGHTS}
    after_wh = False
    for w in words:
        low = w.lower()
        if low in QUESTION_WORDS or after_wh:
            out["question_words"].append(low)
            after_wh = low in ("what", "which") and not after_wh
        elif low in FUNCTION_WORDS:
            out["function_words"].append(low)
        elif w[0].isupper():
            out["entities"].append(low)
        else:
            out["content_words"].append(low)
    return out


def _qbleu1_one(prediction: str, reference: str, weights: dict[str, float],
                delta: float) -> float:
    pred, ref = question_word_types(prediction), question_word_types(reference)
    if not any(pred.values()):
        return 0.0
    present = [t for t in weights if weights[t] > 0 and (pred[t] or ref[t])]
    total = sum(weights[t] for t in present)
    precision = recall = 0.0 if present else 1.0     # no weighted type: nothing to miss
    for t in present:
        same = _overlap(pred[t], ref[t])
        precision += weights[t] / total * (same / len(pred[t]) if pred[t] else 0.0)
        recall += weights[t] / total * (same / len(ref[t]) if ref[t] else 0.0)
    answerability = (2 * precision * recall / (precision + recall)
                     if precision + recall else 0.0)

    def words(types: dict[str, list[str]]) -> str:
        return " ".join(w for t in QBLEU_WEIGHTS for w in types[t])

    fluency = _bleu1_metric(True).sentence_score(words(pred), [words(ref)]).score / 100
    return delta * answerability + (1 - delta) * fluency


def qbleu1(prediction: str, references: str | Iterable[str], *,
           weights: dict[str, float] | None = None, delta: float = QBLEU_DELTA) -> float:
    """Sentence-level Q-BLEU-1 (Nema & Khapra 2018), the best over the references:
    delta * answerability + (1 - delta) * BLEU-1 (a corpus figure is the mean over
    questions, as in the reference implementation).

    Answerability compares the words of each type (:func:`question_word_types`): per type i,
    with m_i the words in common (repeats clipped), P_i = m_i / |prediction's| and
    R_i = m_i / |reference's|; P = sum_i w_i P_i, R = sum_i w_i R_i and answerability =
    2 P R / (P + R), the paper's formula (defaults: :data:`QBLEU_WEIGHTS`, :data:`QBLEU_DELTA`).
    A type neither question has (a clue with no question word, as most Jeopardy clues) is
    left out and the other weights rescaled to sum to 1 (with none left, answerability is 1);
    the reference implementation scores it 0 (coco BLEU of two empty strings), which keeps a
    perfect answer below 1 and makes the score depend on how many types the reference uses.
    BLEU-1 is sacrebleu's sentence BLEU-1 on the same lower-cased words (punctuation dropped,
    as coco-caption's PTB tokenizer does). A prediction with no word scores 0."""
    weights = QBLEU_WEIGHTS if weights is None else weights
    if set(weights) != set(QBLEU_WEIGHTS) or abs(sum(weights.values()) - 1) > 1e-6:
        raise ValueError(f"Q-BLEU weights must give {sorted(QBLEU_WEIGHTS)} summing to 1, got "
                         f"{weights}")
    return _best(_qbleu1_one(prediction, r, weights, delta) for r in _as_list(references))


def label_accuracy(predictions: Sequence[str], labels: Sequence[str | Sequence[str]]) -> float:
    """FEVER's label accuracy: the fraction of predictions equal to the gold label (or one of
    them) after :func:`normalize_answer` ("Supports." is "SUPPORTS"); a generation that names
    no label is wrong. KILT scores FEVER the same way (exact match on the label string)."""
    if len(predictions) != len(labels) or not predictions:
        raise ValueError(f"label_accuracy needs as many labels as predictions (at least one), "
                         f"got {len(predictions)} and {len(labels)}")
    return sum(map(exact_match, predictions, labels)) / len(predictions)


def distinct_ngrams(generations: Iterable[str], n: int = 3) -> float:
    """Distinct n-grams over a whole set of generations (RAG's diversity measure with n=3):
    the number of different n-grams of :func:`generation_tokens` divided by the number of all
    n-grams, taken within each generation (none spans two) and pooled over the set, so a
    tri-gram repeated inside one generation or across two counts once among the distinct
    ones. 0.0 when no generation has n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(t[i:i + n]) for g in generations for t in (generation_tokens(g),)
             for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------- KILT provenance


def _pages(pages: Iterable[Any]) -> list[str]:
    """Page keys as KILT compares them (``str(x).strip()``), first occurrences kept."""
    return list(dict.fromkeys(str(p).strip() for p in pages))


def _evidence_sets(evidence: Iterable[Iterable[Any]]) -> list[set[str]]:
    sets: list[set[str]] = []
    for e in evidence:
        s = set(_pages(e))
        if s and s not in sets:
            sets.append(s)
    return sets


def kilt_r_precision(retrieved: Sequence[Any], evidence: Iterable[Iterable[Any]]) -> float:
    """KILT's R-precision of one example: for each gold evidence set (the pages one output's
    provenance names) of R distinct pages, the fraction of the first R distinct retrieved
    pages in the set; the best over the sets (0.0 with none). Pages are compared as
    ``str(page).strip()`` (KILT uses wikipedia ids; titles work the same way)."""
    guess = _pages(retrieved)
    return _best(len(set(guess[:len(s)]) & s) / len(s) for s in _evidence_sets(evidence))


def kilt_recall_at_k(retrieved: Sequence[Any], evidence: Iterable[Iterable[Any]], k: int
                     ) -> float:
    """KILT's recall@k of one example: the fraction of the gold evidence sets complete within
    the first k places of KILT's rank, in which every evidence set is one place, at the
    position of the last of its pages retrieved (its partial place moves down as its pages
    come), and every other retrieved page one place. 0.0 without evidence sets."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sets = _evidence_sets(evidence)
    if not sets:
        return 0.0
    missing = [set(s) for s in sets]
    rank: list[Any] = []          # True: a set completed; ("set", i): set i in part; False
    for page in _pages(retrieved):
        found = False
        for i, rest in enumerate(missing):
            if page in rest:
                found = True
                if ("set", i) in rank:
                    rank.remove(("set", i))
                rest.discard(page)
                rank.append(True if not rest else ("set", i))
        if not found:
            rank.append(False)
    return sum(r is True for r in rank[:k]) / len(sets)


# ----------------------------------------------------------------------------- predictions


@dataclasses.dataclass(frozen=True)
class RetrievedPassage:
    """One retrieved passage of a prediction: its id (block id) and title, retrieval score,
    whether it holds an answer (:func:`has_answer`), whether it is a gold passage (its title
    or id among the example's ``gold_passages``), and optionally its text."""

    id: int | str
    title: str
    score: float
    has_answer: bool
    is_gold: bool = False
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A question, the predicted answer (None when only retrieval is evaluated), the gold
    answers, whether the prediction is correct (:func:`answer_matches`; None without an
    answer) and the retrieved passages, best first; ``provenance``: the example's gold
    evidence sets when it has them (KILT, FEVER), for :func:`kilt_r_precision` and
    :func:`kilt_recall_at_k`."""

    qid: str
    question: str
    answer: str | None
    gold_answers: tuple[str, ...]
    correct: bool | None
    passages: tuple[RetrievedPassage, ...] = ()
    is_regex: bool = False
    gold_passages: tuple[str, ...] = ()
    provenance: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_retrieval(cls, example: AnswerKey, answer: str | None, *,
                       ids: Sequence[int | str], titles: Sequence[str], texts: Sequence[str],
                       scores: Sequence[float], keep_text: bool = False) -> Prediction:
        """A prediction with its flags computed: correctness, and for each passage (best
        first) whether it holds an answer and whether it is gold."""
        if not len(ids) == len(titles) == len(texts) == len(scores):
            raise ValueError(f"ids, titles, texts and scores differ in length: {len(ids)}, "
                             f"{len(titles)}, {len(texts)}, {len(scores)}")
        gold = set(example.gold_passages)
        passages = tuple(
            RetrievedPassage(_plain(i), str(title), float(score),
                             has_answer(text, example.answers, regex=example.is_regex),
                             str(title) in gold or str(_plain(i)) in gold,
                             text if keep_text else None)
            for i, title, text, score in zip(ids, titles, texts, scores))
        correct = None if answer is None else answer_matches(answer, example)
        provenance = tuple(tuple(s) for s in getattr(example, "provenance", ()))
        return cls(example.qid, example.question, answer, tuple(example.answers), correct,
                   passages, example.is_regex, tuple(example.gold_passages), provenance)

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        for p in record["passages"]:
            if p["text"] is None:
                del p["text"]
        if not record["provenance"]:
            del record["provenance"]
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Prediction:
        fields = dict(record)
        fields["passages"] = tuple(RetrievedPassage(**p) for p in fields.get("passages", ()))
        fields["gold_answers"] = tuple(fields["gold_answers"])
        fields["gold_passages"] = tuple(fields.get("gold_passages", ()))
        fields["provenance"] = tuple(tuple(s) for s in fields.get("provenance", ()))
        return cls(**fields)


def _plain(i: Any) -> int | str:
    """A block id as a JSON-friendly int (numpy integers included) or str."""
    return i if isinstance(i, str) else int(i)


def write_predictions(path: str | os.PathLike, predictions: Iterable[Prediction]) -> Path:
    """Writes one JSON object per prediction, atomically (a temporary file in the same folder,
    fsynced, then renamed over ``path``)."""
    def write(f):
        for p in predictions:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    atomic_write(path, write)
    return Path(path)


def read_predictions(path: str | os.PathLike) -> list[Prediction]:
    """Reads a file written by :func:`write_predictions`."""
    with open(path, encoding="utf-8") as f:
        return [Prediction.from_json(json.loads(line)) for line in f if line.strip()]


def summarize(predictions: Sequence[Prediction], ks: Iterable[int] = DEFAULT_KS
              ) -> dict[str, Any]:
    """Aggregate figures, flat and JSON-friendly:

    - ``count``: predictions;
    - ``exact_match``: the fraction correct (regex match for regex examples) over those with
      an answer (``answered`` of them); absent when none has one;
    - ``recall@k``: the fraction with an answer-holding passage in the top k, for each k up
      to the most passages any prediction has (a larger k would only repeat that figure);
    - ``gold_count`` and ``gold_recall@k``: the same over the predictions that name gold
      passages, a hit being a gold passage.
    """
    if not predictions:
        raise ValueError("no predictions to summarize")
    depth = max(len(p.passages) for p in predictions)
    ks = sorted(k for k in set(ks) if k <= depth)
    out: dict[str, Any] = {"count": len(predictions)}
    answered = [p for p in predictions if p.correct is not None]
    if answered:
        out["answered"] = len(answered)
        out["exact_match"] = sum(p.correct for p in answered) / len(answered)
    gold = [p for p in predictions if p.gold_passages]
    if gold:
        out["gold_count"] = len(gold)
    for prefix, group, hit in (("recall@", predictions, "has_answer"),
                               ("gold_recall@", gold, "is_gold")):
        if group and ks:
            hits = [[getattr(q, hit) for q in p.passages] for p in group]
            out.update((f"{prefix}{k}", r) for k, r in recall_at_k(hits, ks).items())
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A one-row markdown table of :func:`summarize`'s figures (fractions as percentages)."""
    columns = [("questions", str(summary["count"]))]
    if "exact_match" in summary:
        label = "EM" if summary["answered"] == summary["count"] else f"EM (n={summary['answered']})"
        columns.append((label, f"{100 * summary['exact_match']:.1f}"))
    for prefix, label in (("recall@", "R@"), ("gold_recall@", "gold R@")):
        for k in sorted(int(key[len(prefix):]) for key in summary if key.startswith(prefix)):
            name = f"{label}{k}" + (f" (n={summary['gold_count']})"
                                    if prefix == "gold_recall@" else "")
            columns.append((name, f"{100 * summary[f'{prefix}{k}']:.1f}"))
    header = "| " + " | ".join(c for c, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    row = "| " + " | ".join(v for _, v in columns) + " |"
    return "\n".join((header, rule, row))


# ----------------------------------------------------------------------------- scoring files


SCORE_METRICS = ("em", "f1", "bleu1", "rougeL", "qbleu1", "accuracy", "distinct3", "rprec",
                 "recall@K")
DEFAULT_SCORE_METRICS = ("em", "f1")
_METRIC_RE = re.compile(r"em|f1|bleu1|rougeL|qbleu1|accuracy|rprec|distinct[1-9]\d*"
                        r"|recall@[1-9]\d*")


@dataclasses.dataclass(frozen=True)
class ScoredExample:
    """One generation to score: the model's input (``question``), its output, the references
    (CuratedTrec patterns when ``is_regex``) and, for the provenance metrics, the retrieved
    pages (best first) and the gold evidence sets (each a set of pages that together
    support the answer)."""

    question: str
    prediction: str
    answers: tuple[str, ...]
    is_regex: bool = False
    retrieved: tuple[str, ...] = ()
    evidence: tuple[tuple[str, ...], ...] = ()


def parse_metrics(spec: str | Iterable[str]) -> list[str]:
    """Metric names from "em,f1,..." (or a list), checked against :data:`SCORE_METRICS`
    (distinctN and recall@K for any N, K >= 1), repeats dropped."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [m for m in names if m]
    bad = [m for m in names if not _METRIC_RE.fullmatch(m)]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {', '.join(bad) or '(none given)'}; known: "
                         f"{', '.join(SCORE_METRICS)} (distinctN and recall@K for any N, K >= 1)")
    return list(dict.fromkeys(names))


def score(examples: Sequence[ScoredExample], metrics: str | Iterable[str] = DEFAULT_SCORE_METRICS
          ) -> dict[str, Any]:
    """``{"count": n, metric: value, ...}``, values in [0, 1]: em (regex match for regex
    examples), f1, rougeL, qbleu1 and accuracy are means over the examples; bleu1 is
    corpus-level; distinctN pools all predictions; rprec and recall@K are means over the
    examples with gold evidence (``provenance_count`` of them)."""
    names = parse_metrics(metrics)
    if not examples:
        raise ValueError("no examples to score")

    def mean(fn, group=examples) -> float:
        return sum(float(fn(e)) for e in group) / len(group)

    per_example = {"em": lambda e: answer_matches(e.prediction, e),
                   "f1": lambda e: token_f1(e.prediction, e.answers),
                   "rougeL": lambda e: rouge_l(e.prediction, e.answers),
                   "qbleu1": lambda e: qbleu1(e.prediction, e.answers)}
    predictions, references = [e.prediction for e in examples], [e.answers for e in examples]
    out: dict[str, Any] = {"count": len(examples)}
    with_evidence = [e for e in examples if e.evidence]
    for name in names:
        if name in per_example:
            out[name] = mean(per_example[name])
        elif name == "bleu1":
            out[name] = bleu1(predictions, references)
        elif name == "accuracy":
            out[name] = label_accuracy(predictions, references)
        elif name.startswith("distinct"):
            out[name] = distinct_ngrams(predictions, int(name[len("distinct"):]))
        elif not with_evidence:
            raise ValueError(f"metric {name} needs gold provenance ('provenance' or "
                             "'gold_passages'); no example has any")
        elif name == "rprec":
            out["provenance_count"] = len(with_evidence)
            out[name] = mean(lambda e: kilt_r_precision(e.retrieved, e.evidence), with_evidence)
        else:
            out["provenance_count"] = len(with_evidence)
            k = int(name.partition("@")[2])
            out[name] = mean(lambda e: kilt_recall_at_k(e.retrieved, e.evidence, k),
                             with_evidence)
    return out


def _field(record: dict, names: tuple[str, ...], where: str, expected: str) -> Any:
    """The value of the first of ``names`` in ``record``."""
    for name in names:
        if name in record:
            return record[name]
    alternatives = f" (or {', '.join(map(repr, names[1:]))})" if names[1:] else ""
    raise ValueError(f"{where}: field {names[0]!r}{alternatives}: missing; expected {expected}")


def _text_list(value: Any, where: str, field: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, (str, int)) for v in items):
        raise ValueError(f"{where}: field {field!r}: expected a list of strings, got "
                         f"{json.dumps(value)[:80]}")
    return tuple(str(v) for v in items)


def _scored_example(record: Any, where: str) -> ScoredExample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question = _field(record, ("question",), where, "a string")
    prediction = _field(record, ("prediction", "answer"), where, "a string")
    answers = _field(record, ("answers", "gold_answers"), where, "a list of reference strings")
    for name, value in (("question", question), ("prediction", prediction)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r}: expected a string, got "
                             f"{json.dumps(value)}" + (" (no prediction: was only retrieval "
                                                       "evaluated?)" if value is None else ""))
    answers = _text_list(answers, where, "answers")
    if not answers:
        raise ValueError(f"{where}: field 'answers': empty (no reference)")
    is_regex = record.get("is_regex", False)
    if not isinstance(is_regex, bool):
        raise ValueError(f"{where}: field 'is_regex': expected true or false")
    passages = record.get("passages", [])
    if not isinstance(passages, list) or not all(
            isinstance(p, dict) and isinstance(p.get("title"), str) for p in passages):
        raise ValueError(f"{where}: field 'passages': expected a list of objects with a "
                         "'title' string")
    if "provenance" in record:
        sets = record["provenance"]
        if not isinstance(sets, list):
            raise ValueError(f"{where}: field 'provenance': expected a list of evidence sets "
                             "(lists of page titles)")
        evidence = tuple(_text_list(s, where, "provenance") for s in sets)
    else:
        gold = _text_list(record.get("gold_passages", []), where, "gold_passages")
        evidence = tuple((g,) for g in gold)
    return ScoredExample(question, prediction, answers, is_regex,
                         tuple(p["title"] for p in passages), evidence)


def read_scored_examples(path: str | os.PathLike) -> list[ScoredExample]:
    """Reads a JSONL file to score, one object a line (blank lines skipped): ``question``;
    ``prediction`` (or ``answer``, as `realm-jax eval` writes it); ``answers`` (or
    ``gold_answers``), the references, a list of strings or one string; optional
    ``is_regex``; for the provenance metrics, ``passages`` (retrieved, best first: objects
    with a ``title``, as eval writes them) and either ``provenance`` (evidence sets: lists of
    page titles) or ``gold_passages`` (titles, each an evidence set alone: any one does).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the first bad line, naming the file, the line and the field.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"predictions file not found: {p}")
    out = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})"
                                 ) from None
            out.append(_scored_example(record, where))
    if not out:
        raise ValueError(f"{p}: no line to score")
    return out


def score_file(path: str | os.PathLike, metrics: str | Iterable[str] = DEFAULT_SCORE_METRICS
               ) -> dict[str, Any]:
    """:func:`score` of :func:`read_scored_examples`; the metric names are checked first."""
    names = parse_metrics(metrics)
    return score(read_scored_examples(path), names)
