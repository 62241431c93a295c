"""Datasets of RAG's knowledge-intensive tasks beyond short-answer QA, from local files:

- KILT (:func:`read_kilt`; every KILT task: NQ, TriviaQA, FEVER, ...): JSONL, one object a
  line, ``{"id", "input", "output": [{"answer": str, "provenance": [{"wikipedia_id", "title",
  ...}]}, ...]}``. The answers are the outputs' distinct answers; each output that names
  provenance is one gold evidence set (its pages' titles).
- MS MARCO NLGen (:func:`read_msmarco`): the official v2.1 ``.json`` (an object of columns,
  each mapping a row number to the value: ``query``, ``query_id``, ``answers``,
  ``wellFormedAnswers``, where a row without well-formed answers holds ``[]`` or the string
  "[]") or JSONL with those fields per line. "No Answer Present." is no answer.
- Jeopardy question generation (:func:`read_jeopardy`), as in RAG.
- FEVER (:func:`read_fever`): the FEVER JSONL (``{"id", "claim", "label", "evidence":
  [[[annotation_id, evidence_id, page, sentence], ...], ...]}``) or KILT's FEVER. Labels are
  classes of a :class:`LabelSet`, each generated as a target text and mapped back
  (:meth:`LabelSet.label_of`).

Every reader returns :class:`TaskExample`, a :class:`~realm_jax.data.qa.QAExample` whose
``question`` is the model's input and ``answers`` the target references, so code written for
QA reads them unchanged; ``provenance`` and ``label`` add what these tasks have. A bad line
raises :class:`~realm_jax.data.qa.QADataError` naming the file, the line, the field and the
format expected; skipped lines are counted in a SkipCounter and logged.

TFDS (4.9) has none of these datasets (no kilt_tasks, MS MARCO NLGen, SearchQA or FEVER
builder), so they are read from files; ``.gz`` files are read too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from realm_jax.data.qa import (QADataError, QAExample, collect_examples, json_object,
                               jsonl_records, load_json, required_text)
from realm_jax.data.readers import SkipCounter, require_file
from realm_jax.evaluate import normalize_answer

KILT_FORMAT = ('KILT JSONL: {"id", "input", "output": [{"answer", "provenance": '
               '[{"wikipedia_id", "title"}]}]}')
MSMARCO_FORMAT = ('MS MARCO v2.1: a .json object of columns ("query", "query_id", "answers", '
                  '"wellFormedAnswers") or .jsonl objects with those fields')
JEOPARDY_FORMAT = 'SearchQA-style JSONL: {"question": the clue, "answer": the entity}'
FEVER_FORMAT = ('FEVER JSONL: {"id", "claim", "label", "evidence": [[[annotation_id, '
                'evidence_id, page, sentence]]]} (or KILT\'s FEVER)')
NO_ANSWER = "No Answer Present."


@dataclasses.dataclass(frozen=True)
class TaskExample(QAExample):
    """A :class:`QAExample` (``question``: the model's input; ``answers``: the target
    references; ``gold_passages``: the gold pages, once each) with the gold evidence sets
    (``provenance``: tuples of page titles, any one complete set supports the target; what
    KILT's R-precision and recall@k score) and the class ``label`` (FEVER; None otherwise)."""

    provenance: tuple[tuple[str, ...], ...] = ()
    label: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "provenance", tuple(tuple(s) for s in self.provenance))


# ----------------------------------------------------------------------------- labels


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Classes and the text each is generated as (RAG trains FEVER as generation of the
    class's word and scores it as classification)."""

    labels: tuple[str, ...]
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        keys = [normalize_answer(t) for t in self.targets]
        if len(self.labels) != len(self.targets) or len(set(keys)) != len(keys) or "" in keys:
            raise ValueError(f"a LabelSet needs one distinct, non-empty target per label, got "
                             f"{self.labels} -> {self.targets}")

    def target(self, label: str) -> str:
        """The text class ``label`` is generated as."""
        try:
            return self.targets[self.labels.index(label)]
        except ValueError:
            raise ValueError(f"label {label!r} is not one of {self.labels}") from None

    def label_of(self, text: str) -> str | None:
        """The class a generation names (its target or the label itself, compared after
        ``normalize_answer``), or None."""
        key = normalize_answer(text)
        for label, target in zip(self.labels, self.targets):
            if key in (normalize_answer(target), normalize_answer(label)):
                return label
        return None


FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


def fever_labels(ways: int = 3, targets: Sequence[str] | None = None) -> LabelSet:
    """FEVER's classes: 3-way, or the RAG paper's 2-way set (SUPPORTS, REFUTES). Targets
    default to the lower-cased label words; give one-token words of the generator's vocabulary
    (in label order) to decode each class as one token, as RAG does."""
    if ways not in (2, 3):
        raise ValueError(f"FEVER has 3-way and 2-way label sets, not {ways}-way")
    labels = FEVER_LABELS[:ways]
    return LabelSet(labels, tuple(targets) if targets else tuple(x.lower() for x in labels))


# ----------------------------------------------------------------------------- helpers


def _bad(where: str, field: str | None, problem: str, fmt: str) -> QADataError:
    return QADataError(where, field, f"{problem}; expected {fmt}")


def _text(record: dict, field: str, where: str, fmt: str) -> str:
    """A required non-blank string field, stripped."""
    return required_text(record.get(field), where, field, f"; expected {fmt}")


def _qid(record: dict, key: str, index: int, where: str, fmt: str) -> str:
    """``record[key]`` (a string or an integer) as the id, else the record's position."""
    value = record.get(key, index)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise _bad(where, key, f"expected a string or an integer id, got "
                               f"{type(value).__name__}", fmt)
    return str(value)


def _read_lines(path: str | os.PathLike, what: str, fmt: str, skips: SkipCounter | None,
                parse: Callable[[dict, str, int, SkipCounter], TaskExample | None],
                records: Callable[[Path], Iterable[tuple[str, Any]]] | None = None,
                id_field: str = "id") -> list[TaskExample]:
    """The examples ``parse(record, where, index, skips)`` makes of the JSON objects of the
    ``what`` file's lines (or of its ``records(path)``), by :func:`collect_examples`."""
    path, skips = require_file(path, what), SkipCounter() if skips is None else skips
    expected = f"; expected {fmt}"
    return collect_examples(jsonl_records(path, skips) if records is None else records(path),
                            lambda r, w, i: parse(json_object(r, w, expected), w, i, skips),
                            path, skips, noun="examples", expected=expected, id_field=id_field)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _with_evidence(example: TaskExample) -> TaskExample:
    """``gold_passages`` filled with the pages of the evidence sets, once each."""
    pages = _unique(t for s in example.provenance for t in s)
    return dataclasses.replace(example, gold_passages=pages)


# ----------------------------------------------------------------------------- KILT


def _kilt_outputs(record: dict, where: str) -> tuple[list[str], list[tuple[str, ...]]]:
    """(distinct answers, evidence sets) of a KILT record's ``output``."""
    outputs = record.get("output")
    if not isinstance(outputs, list):
        problem = "missing" if outputs is None else f"expected a list, got {type(outputs).__name__}"
        raise _bad(where, "output", problem, KILT_FORMAT)
    answers, sets = [], []
    for i, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise _bad(where, f"output[{i}]", "expected an object", KILT_FORMAT)
        answer = output.get("answer")
        if answer is not None:
            if not isinstance(answer, str):
                raise _bad(where, f"output[{i}].answer", f"expected a string, got "
                                                         f"{type(answer).__name__}", KILT_FORMAT)
            if answer.strip():
                answers.append(answer.strip())
        provenance = output.get("provenance", [])
        if not isinstance(provenance, list):
            raise _bad(where, f"output[{i}].provenance", "expected a list", KILT_FORMAT)
        titles = []
        for j, page in enumerate(provenance):
            title = page.get("title") if isinstance(page, dict) else None
            if not isinstance(title, str) or not title.strip():
                raise _bad(where, f"output[{i}].provenance[{j}].title", "missing or not a "
                                                                        "string", KILT_FORMAT)
            titles.append(title.strip())
        if titles:
            sets.append(_unique(titles))
    return list(dict.fromkeys(answers)), list(dict.fromkeys(sets))


def _kilt_example(record: dict, where: str, index: int, labels: LabelSet | None,
                  skips: SkipCounter) -> TaskExample | None:
    """The example of a KILT record; None (counted) when its FEVER class is not in
    ``labels``."""
    if labels is not None and _excluded_label(_kilt_outputs(record, where)[0], labels):
        skips.skip("label_not_in_set", where)
        return None
    qid = _qid(record, "id", index, where, KILT_FORMAT)
    text = _text(record, "input", where, KILT_FORMAT)
    answers, sets = _kilt_outputs(record, where)
    if not answers:
        raise _bad(where, "output", "no answer in any output (KILT's test files hide them: "
                                    "evaluate on dev)", KILT_FORMAT)
    label = None
    if labels is not None:
        if len(answers) != 1 or answers[0] not in labels.labels:
            raise _bad(where, "output", f"answers {answers} are not one label of "
                                        f"{labels.labels}", KILT_FORMAT)
        label, answers = answers[0], [labels.target(answers[0])]
    return _with_evidence(TaskExample(qid, text, tuple(answers), provenance=tuple(sets),
                                      label=label))


def read_kilt(path: str | os.PathLike, *, labels: LabelSet | None = None,
              skips: SkipCounter | None = None) -> list[TaskExample]:
    """A KILT task's JSONL (see the module docstring). With ``labels`` (a classification
    task: FEVER), each record's answer must be one of the labels: the example's answer is the
    label's target text and ``label`` the label; records whose label is a FEVER class left
    out of ``labels`` (the 2-way set) are skipped."""
    return _read_lines(path, "KILT", KILT_FORMAT, skips,
                       lambda r, w, i, s: _kilt_example(r, w, i, labels, s))


def _excluded_label(answers: Sequence[str], labels: LabelSet) -> bool:
    """A FEVER class the label set leaves out (NOT ENOUGH INFO in the 2-way set)."""
    return len(answers) == 1 and answers[0] in FEVER_LABELS and answers[0] not in labels.labels


# ----------------------------------------------------------------------------- MS MARCO


def _msmarco_answers(value: Any, where: str, field: str) -> list[str]:
    if value is None or value == "[]":           # a row without them
        return []
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _bad(where, field, f"expected a list of strings, got {json.dumps(value)[:80]}",
                   MSMARCO_FORMAT)
    return [a.strip() for a in answers if a.strip() and a.strip() != NO_ANSWER]


def _msmarco_example(record: dict, where: str, index: int, well_formed: bool,
                     skips: SkipCounter) -> TaskExample | None:
    query = _text(record, "query", where, MSMARCO_FORMAT)
    qid = _qid(record, "query_id", index, where, MSMARCO_FORMAT)
    field = "wellFormedAnswers" if well_formed else "answers"
    if not well_formed and field not in record:
        raise _bad(where, field, "missing", MSMARCO_FORMAT)
    answers = _msmarco_answers(record.get(field), where, field)
    if not answers:
        skips.skip("no_well_formed_answer" if well_formed else "no_answer", where)
        return None
    return TaskExample(qid, query, tuple(dict.fromkeys(answers)))


def _msmarco_columns(path: Path) -> Iterator[tuple[str, dict]]:
    """("PATH row R", the row's fields) of the official column-layout ``.json``."""
    data = load_json(path, f"; expected {MSMARCO_FORMAT}")
    if not isinstance(data, dict) or not isinstance(data.get("query"), dict):
        raise _bad(str(path), "query", "no column object (row number -> query)", MSMARCO_FORMAT)
    columns = {k: v for k, v in data.items() if isinstance(v, dict)}
    for row in data["query"]:
        yield f"{path} row {row}", {k: v[row] for k, v in columns.items() if row in v}


def read_msmarco(path: str | os.PathLike, *, well_formed: bool = True,
                 skips: SkipCounter | None = None) -> list[TaskExample]:
    """MS MARCO (see the module docstring): ``.json`` (the official column layout) or
    ``.jsonl``. The input is the query, the targets its well-formed answers (NLGen; rows
    without are skipped and counted), or its answers with ``well_formed=False``."""
    name = require_file(path, "MS MARCO").name.lower().removesuffix(".gz")
    if not name.endswith((".json", ".jsonl", ".ndjson")):
        raise ValueError(f"cannot tell the MS MARCO layout of {path}: name it .json (the "
                         f"official column layout) or .jsonl")
    return _read_lines(path, "MS MARCO", MSMARCO_FORMAT, skips,
                       lambda r, w, i, s: _msmarco_example(r, w, i, well_formed, s),
                       _msmarco_columns if name.endswith(".json") else None, "query_id")


# ----------------------------------------------------------------------------- Jeopardy


def _unquote(clue: str) -> str:
    """A clue without the single quotes some Jeopardy dumps wrap it in."""
    return clue[1:-1].strip() if len(clue) > 2 and clue[0] == clue[-1] == "'" else clue


def read_jeopardy(path: str | os.PathLike, *, skips: SkipCounter | None = None
                  ) -> list[TaskExample]:
    """Jeopardy question generation from SearchQA-style JSONL: the input is ``answer`` (the
    entity), the target ``question`` (the clue, without enclosing single quotes); the id is
    ``id`` when given, else the line's position (0-based)."""
    def parse(record: dict, where: str, index: int, skips: SkipCounter) -> TaskExample:
        clue = _unquote(_text(record, "question", where, JEOPARDY_FORMAT))
        entity = _text(record, "answer", where, JEOPARDY_FORMAT)
        return TaskExample(_qid(record, "id", index, where, JEOPARDY_FORMAT), entity, (clue,))

    return _read_lines(path, "Jeopardy", JEOPARDY_FORMAT, skips, parse)


# ----------------------------------------------------------------------------- FEVER


_FEVER_ESCAPES = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{",
                  "-RCB-": "}", "-COLON-": ":"}


def fever_page_title(page: str) -> str:
    """A FEVER evidence page id as a Wikipedia title: underscores as spaces, the PTB escapes
    (-LRB-, -RRB-, -COLON-, ...) as the characters ("Savages_-LRB-2012_film-RRB-" ->
    "Savages (2012 film)")."""
    for escape, char in _FEVER_ESCAPES.items():
        page = page.replace(escape, char)
    return page.replace("_", " ").strip()


def _fever_evidence(value: Any, where: str) -> list[tuple[str, ...]]:
    """Evidence sets (page titles) of FEVER's ``evidence``: groups of
    [annotation_id, evidence_id, page, sentence] (page null for NOT ENOUGH INFO)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
        raise _bad(where, "evidence", "expected a list of evidence groups", FEVER_FORMAT)
    sets = []
    for i, group in enumerate(value):
        pages = []
        for item in group:
            if not isinstance(item, list) or len(item) != 4:
                raise _bad(where, f"evidence[{i}]", f"expected [annotation_id, evidence_id, "
                                                    f"page, sentence] items, got {item!r}",
                           FEVER_FORMAT)
            if isinstance(item[2], str) and item[2].strip():
                pages.append(fever_page_title(item[2]))
        if pages:
            sets.append(_unique(pages))
    return list(dict.fromkeys(sets))


def read_fever(path: str | os.PathLike, *, labels: LabelSet | None = None,
               skips: SkipCounter | None = None) -> list[TaskExample]:
    """FEVER claims (FEVER's JSONL, or KILT's FEVER: each line may be either): the input is
    the claim, the answer the label's target text (``labels``, default the 3-way
    :func:`fever_labels`), ``label`` the label and ``provenance`` the evidence sets' pages.
    Claims whose FEVER label the set leaves out (NOT ENOUGH INFO in the 2-way set) are
    skipped and counted."""
    labels = fever_labels(3) if labels is None else labels

    def parse(record: dict, where: str, index: int, skips: SkipCounter) -> TaskExample | None:
        if "claim" not in record and "input" in record:       # KILT's FEVER
            return _kilt_example(record, where, index, labels, skips)
        claim = _text(record, "claim", where, FEVER_FORMAT)
        label = _text(record, "label", where, FEVER_FORMAT)
        if label not in labels.labels:
            if label in FEVER_LABELS:
                skips.skip("label_not_in_set", where)
                return None
            raise _bad(where, "label", f"{label!r} is not one of {labels.labels}", FEVER_FORMAT)
        sets = _fever_evidence(record.get("evidence"), where)
        return _with_evidence(TaskExample(_qid(record, "id", index, where, FEVER_FORMAT),
                                          claim, (labels.target(label),),
                                          provenance=tuple(sets), label=label))

    return _read_lines(path, "FEVER", FEVER_FORMAT, skips, parse)


# ----------------------------------------------------------------------------- by name


TASK_FORMATS = ("kilt", "msmarco", "jeopardy", "fever", "fever2")


def read_task(path: str | os.PathLike, task: str, *, skips: SkipCounter | None = None
              ) -> list[TaskExample]:
    """Examples of ``task``: ``kilt`` (any KILT task as QA/generation), ``msmarco`` (NLGen),
    ``jeopardy``, ``fever`` (3-way) or ``fever2`` (the RAG paper's 2-way set), with the
    default label targets."""
    if task not in TASK_FORMATS:
        raise ValueError(f"unknown task data format {task!r}; expected one of "
                         f"{', '.join(TASK_FORMATS)}")
    if task.startswith("fever"):
        return read_fever(path, labels=fever_labels(3 if task == "fever" else 2), skips=skips)
    return {"kilt": read_kilt, "msmarco": read_msmarco, "jeopardy": read_jeopardy}[task](
        path, skips=skips)
