"""Open-domain QA datasets: local JSONL/JSON/TSV files, prepared TFDS datasets
(:func:`load_tfds_qa`), and cloze questions made from a block store
(:func:`questions_from_store`).

Files (:func:`read_qa`):

- JSONL, one object per line (ORQA's and DPR's field names both work): ``question``;
  ``answers`` or ``answer`` (a list of strings, or one string); optional ``id`` (or ``qid``,
  ``question_id``); optional gold passages, ``gold_passages`` (titles or ids) or DPR's
  ``positive_ctxs`` (their titles). ``.jsonl.gz`` is read too.
- JSON: an array of such objects (DPR's retriever files, e.g. ``nq-dev.json``).
- TSV (DPR's ``*.qa.csv``, ORQA's TSVs): ``question<TAB>answers``, the answers a Python list
  literal (``["Limp Bizkit"]``) or a ``|``-separated string. CuratedTrec answers are regular
  expressions (``is_regex``): a non-list answer field is then one pattern, not split at ``|``
  (which is alternation inside a pattern).

A bad row raises :class:`QADataError` naming the file, the line (or record) and the field;
blank lines and a ``question<TAB>answer(s)`` header line are skipped, counted and logged.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from realm_jax.data.readers import (SkipCounter, decode_text, file_format, open_binary,
                                    require_file, source_records)
from realm_jax.evaluate import compile_regex

_log = logging.getLogger(__name__)

QA_FORMATS = {"jsonl": (".jsonl", ".ndjson"), "json": (".json",),
              "tsv": (".tsv", ".txt", ".csv")}
TFDS_QA_DATASETS = ("natural_questions_open", "web_questions", "trivia_qa")
TRIVIA_QA_DEFAULT_CONFIG = "unfiltered.nocontext"  # the open-domain setting of ORQA and DPR
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")


@dataclasses.dataclass(frozen=True)
class QAExample:
    """A question with its answers (regular expressions when ``is_regex``), the titles or ids
    of its gold passages when the dataset names them, and, for questions made from a block
    store, the block they came from."""

    qid: str
    question: str
    answers: tuple[str, ...]
    is_regex: bool = False
    gold_passages: tuple[str, ...] = ()
    source_block: int | None = None

    def __post_init__(self) -> None:
        for name in ("answers", "gold_passages"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"QAExample.{name} must be a sequence of strings, not the "
                                f"string {value!r}")
            object.__setattr__(self, name, tuple(value))


class QADataError(ValueError):
    """A bad record in a QA dataset; the message names where and which field."""

    def __init__(self, where: str, field: str | None, problem: str):
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + problem)
        self.where, self.field = where, field


def string_list(value: Any, where: str, field: str) -> list[str]:
    """A string or a list of strings (JSON ints as ids are accepted for gold passages)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise QADataError(where, field, f"expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) and not (field == "gold_passages" and type(item) is int):
            raise QADataError(where, field,
                              f"item {i} is {type(item).__name__} {item!r}, expected a string")
    return [str(item) for item in value]


def json_object(record: Any, where: str, expected: str = "") -> dict:
    """``record`` if it is a JSON object, else QADataError (``expected`` ends the message)."""
    if not isinstance(record, dict):
        raise QADataError(where, None, f"expected a JSON object, got {type(record).__name__}"
                                       f"{expected}")
    return record


def required_text(value: Any, where: str, field: str, expected: str = "") -> str:
    """A required non-blank string field's ``value``, stripped; else QADataError naming the
    field (``expected`` ends the message)."""
    if value is None or not isinstance(value, str) or not value.strip():
        problem = ("missing" if value is None else "empty" if isinstance(value, str)
                   else f"expected a string, got {type(value).__name__}")
        raise QADataError(where, field, problem + expected)
    return value.strip()


def _example(where: str, qid: str, question: Any, answers: list[str], *, is_regex: bool,
             gold: Sequence[str] = (), hint: str = "") -> QAExample:
    """Validates one row's fields into an example."""
    question = required_text(question, where, "question")
    if not answers:
        raise QADataError(where, "answers", "empty (no answer)" + hint)
    for i, answer in enumerate(answers):
        if not answer.strip():
            raise QADataError(where, "answers", f"answer {i} is blank")
        if is_regex:
            try:
                compile_regex(answer)
            except ValueError as e:
                raise QADataError(where, "answers", str(e)) from None
    return QAExample(qid, question, tuple(answers), is_regex, tuple(gold))


# ----------------------------------------------------------------------------- files


def text_lines(path: Path, skips: SkipCounter) -> Iterator[tuple[int, str, str]]:
    """(line number, "PATH:LINE", text) per non-blank line (blank ones counted in ``skips``),
    decoded one by one so a bad byte names its line."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise QADataError(where, None, f"not UTF-8 (byte {e.start}: {e.reason})"
                                  ) from None
            if line.strip():
                yield lineno, where, line
            else:
                skips.skip("blank_line", where)


def _record_fields(record: Any, where: str) -> tuple[str | None, Any, list[str], list[str]]:
    """(qid or None, question, answers, gold passages) of a JSON object."""
    json_object(record, where)
    key = "answers" if "answers" in record else "answer"
    if key not in record:
        raise QADataError(where, "answers", "missing (expected 'answers' or 'answer')")
    answers = string_list(record[key], where, key)
    qid = next((str(record[k]) for k in ("id", "qid", "question_id") if k in record), None)
    if "gold_passages" in record:
        gold = string_list(record["gold_passages"], where, "gold_passages")
    elif "positive_ctxs" in record:
        ctxs = record["positive_ctxs"]
        if not isinstance(ctxs, list) or not all(
                isinstance(c, dict) and isinstance(c.get("title"), str) for c in ctxs):
            raise QADataError(where, "positive_ctxs", "expected a list of objects with a "
                                                      "'title' string")
        gold = [c["title"] for c in ctxs]
    else:
        gold = []
    return qid, record.get("question"), answers, gold


def jsonl_records(path: Path, skips: SkipCounter) -> Iterator[tuple[str, Any]]:
    """``("PATH:LINE", parsed JSON)`` per line; blank lines are counted in ``skips``."""
    for _, where, line in text_lines(path, skips):
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise QADataError(where, None, f"invalid JSON ({e.msg} at column {e.colno})"
                              ) from None


def load_json(path: Path, expected: str = "") -> Any:
    """A whole JSON file (``.gz`` too); invalid JSON raises QADataError naming the line,
    followed by ``expected`` (what the file should hold)."""
    with open_binary(path) as f:   # json reads bytes as UTF-8, a BOM skipped
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise QADataError(f"{path}:{e.lineno}", None, f"invalid JSON ({e.msg} at column "
                                                          f"{e.colno}){expected}") from None


def json_array_records(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    """``("PATH record I", value)`` per item of a file holding a JSON array of ``what``."""
    data = load_json(path)
    if not isinstance(data, list):
        raise QADataError(str(path), None, f"expected a JSON array of {what}, got "
                                           f"{type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path} record {i}", record


def _tsv_answers(field: str, where: str, is_regex: bool) -> list[str]:
    text = field.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise QADataError(where, "answers", f"unparsable list literal {text[:80]!r} "
                                                f"({type(e).__name__})") from None
        return string_list(value, where, "answers")
    if not text:
        return []
    if is_regex:
        return [text]
    parts = [p.strip() for p in text.split("|")]
    if not all(parts):
        raise QADataError(where, "answers", f"blank answer in {field!r}")
    return parts


def _tsv_rows(path: Path, skips: SkipCounter, is_regex: bool
              ) -> Iterator[tuple[str, tuple[None, str, list[str], list[str]]]]:
    for lineno, where, line in text_lines(path, skips):
        fields = line.split("\t")
        if len(fields) == 1:
            raise QADataError(where, "answers", "missing (no tab after the question)")
        if len(fields) != 2:
            raise QADataError(where, None, f"expected 2 tab-separated fields (question, "
                                           f"answers), got {len(fields)}")
        if lineno == 1 and fields[0].strip().lower() == "question" and \
                fields[1].strip().lower() in ("answer", "answers"):
            skips.skip("header", where)
            continue
        yield where, (None, fields[0], _tsv_answers(fields[1], where, is_regex), [])


def read_qa(path: str | os.PathLike, *, format: str = "auto", regex: bool | None = None,
            skips: SkipCounter | None = None) -> list[QAExample]:
    """Reads a QA file (see the module docstring for the formats).

    Args:
      path: the file.
      format: ``"jsonl"``, ``"json"``, ``"tsv"`` or ``"auto"`` (from the file name).
      regex: whether the answers are regular expressions; None: when the file name contains
        "trec" (CuratedTrec). Patterns are checked when read.
      skips: counts the skipped lines (blank lines, a header) by reason; they are logged.

    Without an id, a question's id is its position in the file (0-based, over kept rows).
    A missing file raises FileNotFoundError; a bad row (see the module docstring) QADataError."""
    p = require_file(path, "QA")
    fmt = file_format(p, format, QA_FORMATS, "QA")
    is_regex = "trec" in p.name.lower() if regex is None else regex
    skips = SkipCounter() if skips is None else skips
    if fmt == "tsv":
        rows: Iterable[tuple[str, Any]] = _tsv_rows(p, skips, is_regex)
    else:
        rows = (jsonl_records(p, skips) if fmt == "jsonl"
                else json_array_records(p, "question objects"))

    def parse(row: Any, where: str, index: int) -> QAExample:
        qid, question, answers, gold = row if fmt == "tsv" else _record_fields(row, where)
        return _example(where, str(index) if qid is None else qid, question, answers,
                        is_regex=is_regex, gold=gold)

    return collect_examples(rows, parse, p, skips)


def collect_examples(rows: Iterable[tuple[str, Any]],
                     parse: Callable[[Any, str, int], QAExample | None], path: Path,
                     skips: SkipCounter, *, noun: str = "questions", expected: str = "",
                     id_field: str = "id") -> list:
    """The examples ``parse(record, where, index)`` makes of the ``(where, record)`` rows of
    the file ``path`` (None: skipped), with no id repeated; ValueError when none is left.
    ``expected`` (what the file should hold) ends the error messages."""
    out: list[QAExample] = []
    seen: dict[str, str] = {}
    for index, (where, record) in enumerate(rows):
        example = parse(record, where, index)
        if example is None:
            continue
        if example.qid in seen:
            raise QADataError(where, id_field, f"{example.qid!r} repeats the id of "
                                               f"{seen[example.qid]}{expected}")
        seen[example.qid] = where
        out.append(example)
    if not out:
        raise ValueError(f"no {noun} in {path} (skipped: {skips.as_dict() or 'nothing'})"
                         f"{expected}")
    if skips.counts:
        _log.info("read %d %s from %s; skipped %s", len(out), noun, path, skips.as_dict())
    return out


# ----------------------------------------------------------------------------- TFDS


def _texts(value: Any) -> list[str]:
    return [decode_text(v) for v in value]


def tfds_record_to_example(dataset: str, record: dict[str, Any], index: int, *,
                           where: str | None = None) -> QAExample:
    """One TFDS record (a dict of numpy values, as ``tfds.data_source`` gives them) of
    ``natural_questions_open``, ``web_questions`` or ``trivia_qa`` (any config) as a
    :class:`QAExample`. TriviaQA's answers are its value then its aliases, without repeats."""
    base = _tfds_parts(dataset)[0]
    where = where or f"tfds:{dataset} record {index}"
    hint = ""
    if base == "natural_questions_open":
        qid, answers = str(index), _texts(record["answer"])
    elif base == "web_questions":
        qid, answers = str(index), _texts(record["answers"])
    elif base == "trivia_qa":
        answer = record["answer"]
        qid = decode_text(record["question_id"])
        answers = list(dict.fromkeys(
            a for a in [decode_text(answer["value"])] + _texts(answer["aliases"]) if a))
        hint = " (TriviaQA's test answers are not public: evaluate on 'validation')"
    else:
        raise ValueError(f"no QA reader for TFDS dataset {dataset!r}; supported: "
                         f"{', '.join(TFDS_QA_DATASETS)}")
    return _example(where, qid, decode_text(record["question"]), answers, is_regex=False,
                    hint=hint)


def _tfds_parts(name: str) -> tuple[str, str | None, str | None]:
    """``base[/config][:version]`` -> (base, config, version)."""
    name, _, version = name.removeprefix("tfds:").partition(":")
    base, _, config = name.partition("/")
    return base, config or None, version or None


def _prepare_hint(dataset: str, data_dir: Path) -> str:
    return (f"prepare it there first, on a machine with network access: `tfds build {dataset} "
            f"--data_dir {data_dir} --file_format array_record` (or in Python: "
            f"tfds.builder({dataset!r}, data_dir={str(data_dir)!r}, "
            f"file_format='array_record').download_and_prepare())")


def load_tfds_qa(name: str, split: str, *, data_dir: str | os.PathLike | None = None
                 ) -> list[QAExample]:
    """The questions of a prepared TFDS QA dataset split, in record order.

    ``name``: ``natural_questions_open`` (splits ``train``, ``validation``: the latter is the
    NQ-open test set of ORQA/DPR), ``web_questions`` (``train``, ``test``) or ``trivia_qa``
    with a config (``trivia_qa/unfiltered.nocontext``, the default, or
    ``trivia_qa/rc.nocontext``; ``validation`` is the usual test set); a ``:VERSION`` may
    follow. ``data_dir`` defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.

    Never downloads. The prepared files are looked for before TFDS is even imported: a
    missing dataset, an unknown split or a non-array_record build raises at once
    (``FileNotFoundError`` / ``ValueError``) naming the dataset, the folder and the command
    that prepares it."""
    base, config, version = _tfds_parts(name)
    if base not in TFDS_QA_DATASETS:
        raise ValueError(f"no QA reader for TFDS dataset {name!r}; supported: "
                         f"{', '.join(TFDS_QA_DATASETS)}")
    if base == "trivia_qa" and config is None:
        config = TRIVIA_QA_DEFAULT_CONFIG
    dataset = base + (f"/{config}" if config else "")
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
                ).expanduser()
    folder = root / dataset
    infos = sorted((p for p in folder.glob(f"{version or '*'}/dataset_info.json")
                    if _VERSION_RE.fullmatch(p.parent.name)),  # not "incomplete.*" folders
                   key=lambda p: tuple(int(x) for x in p.parent.name.split(".")))
    if not infos:
        raise FileNotFoundError(f"TFDS dataset {dataset!r}"
                                f"{f' version {version}' if version else ''} is not prepared "
                                f"in {root} (no {folder}/*/dataset_info.json); "
                                + _prepare_hint(dataset, root))
    info = json.loads(infos[-1].read_text())  # the newest version when several
    stored_as = info.get("fileFormat", "tfrecord")
    if stored_as not in ("array_record", "parquet"):
        raise ValueError(f"TFDS dataset {dataset!r} in {infos[-1].parent} was prepared as "
                         f"{stored_as}, which has no random access without TensorFlow; "
                         + _prepare_hint(dataset, root))
    splits = {s.get("name") for s in info.get("splits", [])}
    for part in split.split("+"):
        if part.split("[")[0] not in splits:
            raise ValueError(f"TFDS dataset {dataset!r} in {infos[-1].parent} has no split "
                             f"{part!r}; it has {sorted(splits)}")
    import tensorflow_datasets as tfds  # only now: importing it takes a second

    version_dir = infos[-1].parent.name
    try:
        source = tfds.data_source(f"{dataset}:{version_dir}", split=split, data_dir=root,
                                  download=False)
    except Exception as e:  # e.g. missing or corrupt shards
        raise FileNotFoundError(f"TFDS dataset {dataset!r} (split {split!r}) cannot be read "
                                f"from {root}: {str(e).splitlines()[0]}; "
                                + _prepare_hint(dataset, root)) from e
    return [tfds_record_to_example(dataset, r, i, where=f"tfds:{dataset}[{split}] record {i}")
            for i, r in source_records(source, 1024)]


def load_qa(spec: str | os.PathLike, *, split: str = "test",
            data_dir: str | os.PathLike | None = None, regex: bool | None = None
            ) -> list[QAExample]:
    """Questions from a file (``.jsonl``, ``.json``, ``.tsv``, ``.txt``, ``.csv``, optionally
    ``.gz``; ``split`` is ignored) or from a prepared TFDS dataset (``NAME`` or ``tfds:NAME``
    of :func:`load_tfds_qa`, with ``split`` and ``data_dir``)."""
    s = os.fspath(spec)
    exists = Path(s).exists()
    if s.startswith("tfds:") or (_tfds_parts(s)[0] in TFDS_QA_DATASETS and not exists):
        return load_tfds_qa(s, split, data_dir=data_dir)
    if not exists and not Path(s).suffix:
        raise ValueError(f"{s!r} is neither a QA file (.jsonl, .json, .tsv) nor a supported "
                         f"TFDS dataset ({', '.join(TFDS_QA_DATASETS)})")
    return read_qa(s, regex=regex)


# ----------------------------------------------------------------------------- from a store


def questions_from_store(store: Any, tokenizer: Any, *, num: int, seed: int,
                         block_ids: Iterable[int] | None = None) -> list[QAExample]:
    """Cloze questions from a block store, for demos and tests.

    Blocks are visited in a seeded random order; in each, :class:`QueryMaker` (with the
    store's default span finders) picks a salient span per sentence, and one of those
    sentences is kept (seeded by ``seed`` and the block id). The question is the sentence
    with the span replaced by ``_`` ("X was born in _ in Ulm."), the answer the span's text,
    the gold passage the block's title, ``source_block`` the block id and the id
    ``store-BLOCK``. These are cloze questions, not natural ones. Deterministic given ``seed``.

    Returns ``num`` questions, or fewer (with a warning) when the blocks give fewer."""
    from realm_jax.data.realm_examples import QueryMaker  # tokenizers, transformers

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    maker = QueryMaker.for_store(store, tokenizer)
    ids = np.arange(len(store)) if block_ids is None else np.asarray(list(block_ids), np.int64)
    order = np.random.default_rng(seed).permutation(ids).tolist()
    out: list[QAExample] = []
    skipped: collections.Counter[str] = collections.Counter()
    queries = maker.iter_store(store, order, seed=seed, skipped=skipped)
    for block_id, group in itertools.groupby(queries, key=lambda q: q.block_id):
        sentences = list(group)
        q = sentences[int(np.random.default_rng([seed, block_id]).integers(len(sentences)))]
        cloze = q.sentence[:q.span.start] + "_" + q.sentence[q.span.end:]
        title = store.title(block_id)
        out.append(QAExample(f"store-{block_id}", cloze, (q.span_text,),
                             gold_passages=(title,) if title else (), source_block=block_id))
        if len(out) == num:
            break
    if not out:
        raise ValueError(f"no sentence with a salient span in the {len(ids)} blocks given of "
                         f"{getattr(store, 'path', store)} (sentences skipped: "
                         f"{dict(skipped)})")
    if len(out) < num:
        _log.warning("questions_from_store: %d questions asked, the %d blocks gave %d",
                     num, len(ids), len(out))
    return out
