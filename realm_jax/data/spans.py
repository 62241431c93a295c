"""Salient spans (named entities and dates) and sentence splitting, for REALM's masking.

A span finder maps a text to :class:`SalientSpan` character ranges: dates, numbers,
capitalized phrases, spaCy entities, or the union of several (:func:`make_finder`).

Wikipedia link anchors come with the documents (:class:`realm_jax.data.Span`);
:func:`anchor_spans` turns them into salient spans, keeping only entity-like anchors by
default. Pre-annotated spans in a JSONL record are read by :func:`parse_span_annotations`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from realm_jax.data.wikitext import Span


class SalientSpan(NamedTuple):
    """``text[start:end]`` is a salient span; ``label`` says what found it (``ANCHOR``,
    ``DATE``, ``NUMBER``, ``PHRASE``, ``ANNOTATED`` or a spaCy entity label)."""

    start: int
    end: int
    label: str


@runtime_checkable
class SpanFinder(Protocol):
    """Finds salient spans in a text (character offsets, any order, may overlap)."""

    def __call__(self, text: str) -> list[SalientSpan]:
        ...


def resolve_overlaps(spans: Iterable[SalientSpan]) -> list[SalientSpan]:
    """Non-overlapping spans, sorted by start: longer spans win, then earlier ones, then the
    earlier-listed one (so list higher-priority sources first)."""
    ordered = sorted(enumerate(spans), key=lambda p: (p[1].start - p[1].end, p[1].start, p[0]))
    kept: list[SalientSpan] = []
    for _, s in ordered:
        if s.end > s.start and all(s.end <= k.start or s.start >= k.end for k in kept):
            kept.append(s)
    return sorted(kept)


# ----------------------------------------------------------------------------- sentences

# Words after which a period does not end a sentence (lower-cased, without the period).
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "sen", "rep", "gov", "gen", "col",
    "lt", "sgt", "capt", "cmdr", "adm", "rev", "hon", "pres", "vs", "etc", "e.g", "i.e", "cf",
    "al", "no", "nos", "vol", "vols", "fig", "figs", "ed", "eds", "co", "corp", "inc", "ltd",
    "bros", "dept", "univ", "approx", "ca", "c", "est", "op", "pp", "p", "jan", "feb", "mar",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "ft", "ave", "blvd", "rd"))
_SENTENCE_END_RE = re.compile(r"([.!?…]+)[\"'”’)\]]*\s+(?=[\"'“‘(\[]?(\S))|\n\s*")
_LAST_WORD_RE = re.compile(r"([\w.'’]+)$")


def split_sentences(text: str, protected: Sequence[tuple[int, int]] = ()
                    ) -> list[tuple[int, int]]:
    """Rule-based sentence boundaries: ``[(start, end), ...]`` with surrounding whitespace
    trimmed, empty sentences dropped.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (plus closing quotes or brackets) before
    whitespace and an upper-case letter or digit, and at every line break. A period after an
    initial ("J. R. R. Tolkien") or a known abbreviation ("Dr.", "St.", "e.g.") does not end
    one, and no boundary falls inside a ``protected`` ``(start, end)`` range.
    """
    cuts = []
    for m in _SENTENCE_END_RE.finditer(text):
        if m.group(1) is not None:
            nxt = m.group(2)
            if not (nxt.isupper() or nxt.isdigit()):
                continue
            if m.group(1) == ".":
                # The word before the period; a bounded window keeps this linear in the text.
                word = _LAST_WORD_RE.search(text, max(0, m.start(1) - 64), m.start(1))
                w = word.group(1).lower().strip(".") if word else ""
                last = w.rsplit(".", 1)[-1]  # "u.s" -> "s"
                if (len(last) == 1 and last.isalpha()) or w in _ABBREVIATIONS:
                    continue
        cut = m.end()
        if any(s < cut < e for s, e in protected):
            continue
        cuts.append(cut)
    out = []
    for start, end in zip([0] + cuts, cuts + [len(text)]):
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        stripped = piece.strip()
        if stripped:
            out.append((start + lead, start + lead + len(stripped)))
    return out


# ----------------------------------------------------------------------------- dates, numbers

_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November"
          r"|December|(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)\.?)")
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:1\d{3}|20\d{2})"
_ERA = r"(?:BCE|BC|AD|CE|B\.C\.|A\.D\.)"
_ORDINAL_WORDS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh"
                  "|twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth"
                  "|nineteenth|twentieth|twenty-first")
_DATE_RE = re.compile(
    r"(?<![\w$£€¥.,])(?:"
    rf"{_DAY} {_MONTH},? {_YEAR}"                                  # 14 March 1879
    rf"|{_MONTH} {_DAY},? {_YEAR}"                                 # March 14, 1879
    rf"|{_YEAR}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"          # 1879-03-14
    rf"|{_MONTH},? {_YEAR}"                                        # July 1969
    rf"|{_DAY} {_MONTH}"                                           # 14 March
    rf"|{_MONTH} {_DAY}(?!\d)"                                     # March 14
    rf"|(?:\d{{1,2}}(?:st|nd|rd|th)|(?i:{_ORDINAL_WORDS}))[ -][Cc]entury(?: {_ERA})?"
    rf"|\d{{1,4}} ?{_ERA}"                                         # 44 BC
    rf"|(?:AD|CE) ?\d{{1,4}}"                                      # AD 79
    r"|(?:1\d{2}|20\d)0s"                                          # 1960s
    rf"|{_YEAR}"                                                   # 1879
    r")(?![\w%]|[.,]\d)")
_NUMBER_RE = re.compile(
    r"(?<![\w.,-])[$£€¥]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    r"(?: ?%| (?:percent|per cent|hundred|thousand|million|billion|trillion)\b)?"
    r"(?![\w%]|[.,-]\d)")


class DateFinder:
    """Dates by pattern ("14 March 1879", "March 14, 1879", "July 1969", "1879", "1960s",
    "19th century", "44 BC", "1879-03-14"); labels ``DATE``. The article in "the 1960s" is not
    part of the span."""

    def __call__(self, text: str) -> list[SalientSpan]:
        return [SalientSpan(m.start(), m.end(), "DATE") for m in _DATE_RE.finditer(text)]


class NumberFinder:
    """Numbers ("42", "3.14", "1,000,000", "$5 million", "45%"); labels ``NUMBER``."""

    def __call__(self, text: str) -> list[SalientSpan]:
        return [SalientSpan(m.start(), m.end(), "NUMBER") for m in _NUMBER_RE.finditer(text)]


# ----------------------------------------------------------------------------- capitalized

_WORD_RE = re.compile(r"(?:[^\W\d_]\.){2,}|[^\W\d_]\.(?=\s+[^\W\d_])|[^\W_]+(?:[-'’][^\W_]+)*")
_CONNECTORS = frozenset(("of", "the", "de", "du", "des", "la", "le", "von", "van", "der", "den",
                         "da", "di", "del", "y", "al"))
# Capitalized words that are not names on their own (mostly sentence-initial function words).
_NOT_NAMES = frozenset((
    "a", "an", "the", "in", "on", "at", "for", "by", "with", "from", "to", "of", "and", "but",
    "or", "nor", "as", "after", "before", "during", "since", "until", "this", "that", "these",
    "those", "it", "its", "he", "she", "they", "we", "i", "you", "his", "her", "their", "our",
    "my", "your", "there", "here", "when", "while", "where", "if", "although", "though",
    "however", "also", "many", "some", "most", "each", "both", "all", "no", "not", "one",
    "other", "such", "what", "which", "who", "whom", "whose", "why", "how", "then", "thus",
    "because", "so", "yet", "following", "according", "despite", "among", "between", "under",
    "over", "about", "into", "through", "within", "without", "upon", "today", "later", "early",
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))
_POSSESSIVE_RE = re.compile(r"['’]s?$")


class CapitalizedPhraseFinder:
    """Runs of capitalized words ("University of Cambridge", "J. R. R. Tolkien"), joined by
    single spaces or by connectors ("of", "de", "von", ...), as a cheap stand-in for NER on
    plain text; labels ``PHRASE``.

    Leading function words ("The", "In") and a trailing possessive ("'s") are trimmed. A
    single word at the start of a sentence is kept only if it has another capital ("NASA",
    "McCartney") or also appears capitalized elsewhere in the text (otherwise it is probably
    capitalized only because it starts the sentence).
    """

    def __call__(self, text: str) -> list[SalientSpan]:
        words = [(m.start(), m.end(), m.group()) for m in _WORD_RE.finditer(text)]
        starts = {s for s, _ in split_sentences(text)}
        initial = [self._is_initial(text, w[0], starts) for w in words]
        capitalized_elsewhere = {w[2] for w, first in zip(words, initial)
                                 if not first and w[2][0].isupper()}
        found = []
        i = 0
        while i < len(words):
            if not words[i][2][0].isupper():
                i += 1
                continue
            j = i + 1  # the phrase is words[i:j]
            while j < len(words):
                k = j
                while (k < len(words) and words[k][2] in _CONNECTORS and k - j < 2
                       and self._joined(text, words[k - 1], words[k])):
                    k += 1
                if (k < len(words) and words[k][2][0].isupper()
                        and self._joined(text, words[k - 1], words[k])):
                    j = k + 1
                else:
                    break
            found.extend(self._trim(text, words[i:j], initial[i], capitalized_elsewhere))
            i = j
        return found

    @staticmethod
    def _is_initial(text: str, start: int, sentence_starts: set[int]) -> bool:
        k = start
        while k > 0 and text[k - 1] in "\"'“‘([":
            k -= 1
        return k in sentence_starts

    @staticmethod
    def _joined(text: str, a: tuple[int, int, str], b: tuple[int, int, str]) -> bool:
        return text[a[1]:b[0]] == " "

    @staticmethod
    def _trim(text: str, phrase: list[tuple[int, int, str]], initial: bool,
              capitalized_elsewhere: set[str]) -> list[SalientSpan]:
        lead = 0
        while lead < len(phrase) and phrase[lead][2].lower() in _NOT_NAMES:
            lead += 1
        phrase = phrase[lead:]
        if not phrase:
            return []
        word = phrase[0][2]
        if (len(phrase) == 1 and initial and lead == 0 and word not in capitalized_elsewhere
                and not any(c.isupper() for c in word[1:])):
            return []
        start, end = phrase[0][0], phrase[-1][1]
        possessive = _POSSESSIVE_RE.search(text, start, end)
        if possessive and possessive.start() > start:
            end = possessive.start()
        return [SalientSpan(start, end, "PHRASE")]


# ----------------------------------------------------------------------------- spaCy

SPACY_ENTITY_LABELS = frozenset(("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT",
                                 "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE", "DATE"))


class SpacyFinder:
    """spaCy NER spans with the given labels (named entities and dates by default).

    ``model`` is an installed spaCy pipeline name (e.g. ``en_core_web_sm``) or an already
    loaded pipeline (any callable returning a doc with ``ents``). spaCy is imported, and the
    pipeline loaded, at the first call.
    """

    def __init__(self, model: str | Any = "en_core_web_sm",
                 labels: Iterable[str] = SPACY_ENTITY_LABELS):
        self.model = model
        self.labels = frozenset(labels)
        self._nlp = None if isinstance(model, str) else model

    def _pipeline(self) -> Any:
        if self._nlp is None:
            try:
                import spacy
            except ImportError as e:
                raise ImportError(
                    "SpacyFinder needs the 'spacy' package and a pipeline: `pip install spacy` "
                    f"then `python -m spacy download {self.model}`") from e
            try:
                nlp = spacy.load(self.model)
            except OSError as e:
                raise OSError(f"spaCy pipeline {self.model!r} is not installed: run `python -m "
                              f"spacy download {self.model}` (or name an installed one)") from e
            for name in ("parser", "lemmatizer"):  # not needed for entities; slow
                if name in nlp.pipe_names:
                    nlp.disable_pipe(name)
            self._nlp = nlp
        return self._nlp

    def __call__(self, text: str) -> list[SalientSpan]:
        doc = self._pipeline()(text)
        return [SalientSpan(e.start_char, e.end_char, e.label_) for e in doc.ents
                if e.label_ in self.labels and e.end_char > e.start_char]


class CombinedFinder:
    """The spans of several finders, overlaps resolved longest-first (ties: earlier finder)."""

    def __init__(self, finders: Sequence[SpanFinder]):
        self.finders = tuple(finders)

    def __call__(self, text: str) -> list[SalientSpan]:
        return resolve_overlaps(s for f in self.finders for s in f(text))


_FINDERS = {"dates": DateFinder, "numbers": NumberFinder, "capitalized": CapitalizedPhraseFinder}


def make_finder(spec: str) -> SpanFinder | None:
    """A finder from a config string: ``+``-joined names from ``dates``, ``numbers``,
    ``capitalized``, ``spacy`` or ``spacy:MODEL``; ``none`` or ``""`` gives None."""
    names = [n.strip() for n in spec.split("+") if n.strip() and n.strip() != "none"]
    finders: list[SpanFinder] = []
    for name in names:
        if name == "spacy" or name.startswith("spacy:"):
            finders.append(SpacyFinder(name.partition(":")[2] or "en_core_web_sm"))
        elif name in _FINDERS:
            finders.append(_FINDERS[name]())
        else:
            raise ValueError(f"unknown span finder {name!r} in {spec!r}; expected "
                             f"{', '.join(_FINDERS)}, spacy or spacy:MODEL joined by '+'")
    if not finders:
        return None
    return finders[0] if len(finders) == 1 else CombinedFinder(finders)


# ----------------------------------------------------------------------------- anchors

AnchorFilter = Literal["entities", "all", "none"]


def anchor_spans(text: str, spans: Sequence[Span], sentences: Sequence[tuple[int, int]] = (),
                 keep: AnchorFilter = "entities", label: str = "ANCHOR") -> list[SalientSpan]:
    """Link anchors (or pre-annotated spans) as salient spans.

    ``keep="entities"`` keeps anchors that look like names: with an upper-case letter
    (not counting the first letter of a sentence) or a digit; so "French Revolution" and
    "1879" stay, "state" and "political philosophy" go. ``"all"`` keeps every span,
    ``"none"`` none.
    """
    if keep == "none":
        return []
    if keep not in ("entities", "all"):
        raise ValueError(f"keep must be 'entities', 'all' or 'none', got {keep!r}")
    starts = {s for s, _ in sentences}
    out = []
    for start, end, _ in spans:
        if not 0 <= start < end <= len(text):
            continue
        piece = text[start:end]
        if keep == "entities":
            rest = piece[1:] if start in starts else piece
            if not any(c.isupper() or c.isdigit() for c in rest):
                continue
        out.append(SalientSpan(start, end, label))
    return out


# ----------------------------------------------------------------------------- annotations


def parse_span_annotations(value: Any, text: str, *, offsets: Literal["char", "byte"] = "char"
                           ) -> list[Span]:
    """Pre-annotated spans from a JSON record field, as :class:`Span` (``target`` = label).

    Accepts a list of ``[start, end]``, ``[start, end, label]`` or
    ``{"start": .., "end": .., "label": ..}`` items; offsets count characters of ``text``
    (``offsets="char"``) or bytes of its UTF-8 encoding (``"byte"``, as in REALM's
    preprocessed data). Raises ValueError for a malformed item or an offset outside the text
    or inside a UTF-8 character.
    """
    if not isinstance(value, list):
        raise ValueError(f"spans must be a list, got {type(value).__name__}")
    if offsets not in ("char", "byte"):
        raise ValueError(f"offsets must be 'char' or 'byte', got {offsets!r}")
    encoded = text.encode("utf-8") if offsets == "byte" else b""

    def to_char(off: int) -> int:
        if offsets == "char":
            return off
        try:
            return len(encoded[:off].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"byte offset {off} is inside a UTF-8 character") from e

    limit = len(encoded) if offsets == "byte" else len(text)
    out = []
    for item in value:
        if isinstance(item, dict):
            start, end = item.get("start"), item.get("end")
            label = item.get("label", item.get("type", "ANNOTATED"))
        elif isinstance(item, (list, tuple)) and len(item) in (2, 3):
            start, end = item[0], item[1]
            label = item[2] if len(item) == 3 else "ANNOTATED"
        else:
            raise ValueError(f"bad span {item!r}: expected [start, end(, label)] or "
                             "{'start', 'end', 'label'}")
        if (not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool)
                or not 0 <= start < end <= limit):
            raise ValueError(f"bad span {item!r}: need integers 0 <= start < end <= {limit}")
        out.append(Span(to_char(start), to_char(end), str(label)))
    return out
