"""Open-domain QA evaluation: exact match, regex match, answer-in-passage, recall@k.

Pure Python (no JAX). The rules, and where they come from:

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

import dataclasses
import functools
import json
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from realm_jax.durable import atomic_write

if TYPE_CHECKING:
    from realm_jax.data.qa import QAExample

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


def answer_matches(prediction: str, example: QAExample) -> bool:
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
    answer) and the retrieved passages, best first."""

    qid: str
    question: str
    answer: str | None
    gold_answers: tuple[str, ...]
    correct: bool | None
    passages: tuple[RetrievedPassage, ...] = ()
    is_regex: bool = False
    gold_passages: tuple[str, ...] = ()

    @classmethod
    def from_retrieval(cls, example: QAExample, answer: str | None, *,
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
        return cls(example.qid, example.question, answer, tuple(example.answers), correct,
                   passages, example.is_regex, tuple(example.gold_passages))

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        for p in record["passages"]:
            if p["text"] is None:
                del p["text"]
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Prediction:
        fields = dict(record)
        fields["passages"] = tuple(RetrievedPassage(**p) for p in fields.get("passages", ()))
        fields["gold_answers"] = tuple(fields["gold_answers"])
        fields["gold_passages"] = tuple(fields.get("gold_passages", ()))
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
        keys = sorted((int(k[len(prefix):]) for k in summary if k.startswith(prefix)))
        for k in keys:
            name = f"{label}{k}" + (f" (n={summary['gold_count']})"
                                    if prefix == "gold_recall@" else "")
            columns.append((name, f"{100 * summary[f'{prefix}{k}']:.1f}"))
    header = "| " + " | ".join(c for c, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    row = "| " + " | ".join(v for _, v in columns) + " |"
    return "\n".join((header, rule, row))
