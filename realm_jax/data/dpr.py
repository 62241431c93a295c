"""DPR retriever training data: reading DPR's files, choosing each question's passages, and
fixed-length rows for the towers.

Files (:func:`read_dpr`): DPR's JSON (an array of records, e.g. ``nq-train.json``) or JSONL
with one such record per line (``.json``, ``.jsonl``, ``.ndjson``, optionally ``.gz``)::

    {"question": str, "answers": [str, ...],
     "positive_ctxs": [ctx, ...], "negative_ctxs": [ctx, ...], "hard_negative_ctxs": [ctx, ...]}
    ctx = {"title": str, "text": str, "passage_id": str | int (optional; DPR's "psg_id" too)}

A record without a positive passage is skipped and counted (``no_positive_ctx``), as DPR's
loader drops such questions; every other bad record raises
:class:`realm_jax.data.qa.QADataError` naming the file, the record (index or line) and the
field. Other fields of a record are kept (``extra``), so a file rewritten by the hard-negative
miner keeps them.

Passages per question (:func:`choose_passages`), as DPR's ``create_biencoder_input``: the
first positive (a random one with ``shuffle_positives``), then ``num_hard_negatives``
negatives taken from ``hard_negative_ctxs`` first and, when those run out, from
``negative_ctxs`` (each list shuffled with the example's generator when ``shuffle``, as DPR
shuffles for training). Unlike DPR, whose batches hold a varying number of passages, the
layout is fixed: a question short of negatives gets empty slots marked invalid
(``passage_valid``), which the loss (`realm_jax.objectives.retrieval.dpr_loss`) leaves out.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from realm_jax.data.blocks import load_tokenizer
from realm_jax.data.pipeline import check_batch_split, host_share
from realm_jax.data.qa import (QADataError, json_array_records, json_object, jsonl_records,
                               required_text, string_list)
from realm_jax.data.readers import SkipCounter, file_format, require_file
from realm_jax.data.realm_examples import special_ids
from realm_jax.data.rows import row
from realm_jax.durable import atomic_write

CTX_FIELDS = ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs")
DPR_FORMATS = {"json": (".json",), "jsonl": (".jsonl", ".ndjson")}


@dataclasses.dataclass(frozen=True)
class Passage:
    """A DPR context: title, text, the corpus id when the file gives one, and the block id
    in a block store when it came from one (the hard-negative miner's)."""

    title: str
    text: str
    passage_id: str | None = None
    block_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """DPR's context object; the ids only when known."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class DprRecord:
    """One training question with its passages; ``where`` names its file and record."""

    question: str
    answers: tuple[str, ...]
    positive_ctxs: tuple[Passage, ...]
    negative_ctxs: tuple[Passage, ...] = ()
    hard_negative_ctxs: tuple[Passage, ...] = ()
    where: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The record in DPR's format (other fields of the source record kept)."""
        out = dict(self.extra)
        out.update(question=self.question, answers=list(self.answers))
        for name in CTX_FIELDS:
            out[name] = [p.to_json() for p in getattr(self, name)]
        return out


# ----------------------------------------------------------------------------- reading


def _passages(value: Any, where: str, field: str) -> tuple[Passage, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise QADataError(where, field, f"expected a list of contexts, got {type(value).__name__}")
    out = []
    for i, ctx in enumerate(value):
        if not isinstance(ctx, dict):
            raise QADataError(where, field, f"context {i} is {type(ctx).__name__}, expected an "
                                            "object with 'title' and 'text'")
        title, text = ctx.get("title", ""), ctx.get("text")
        if not isinstance(title, str):
            raise QADataError(where, f"{field}[{i}].title",
                              f"expected a string, got {type(title).__name__}")
        required_text(text, where, f"{field}[{i}].text")   # kept as written, not stripped
        pid = ctx.get("passage_id", ctx.get("psg_id"))
        if pid is not None and not isinstance(pid, (str, int)):
            raise QADataError(where, f"{field}[{i}].passage_id",
                              f"expected a string or an integer, got {type(pid).__name__}")
        block = ctx.get("block_id")
        if block is not None and type(block) is not int:
            raise QADataError(where, f"{field}[{i}].block_id",
                              f"expected an integer, got {type(block).__name__}")
        out.append(Passage(title, text, None if pid is None else str(pid), block))
    return tuple(out)


def parse_dpr_record(record: Any, where: str) -> DprRecord:
    """Validates one DPR record (a parsed JSON object)."""
    question = required_text(json_object(record, where).get("question"), where, "question")
    answers = string_list(record.get("answers", []), where, "answers")
    ctxs = {name: _passages(record.get(name), where, name) for name in CTX_FIELDS}
    extra = {k: v for k, v in record.items()
             if k not in ("question", "answers") + CTX_FIELDS}
    return DprRecord(question, tuple(answers), **ctxs, where=where, extra=extra)


def read_dpr(path: str | os.PathLike, *, format: str = "auto",
             skips: SkipCounter | None = None) -> list[DprRecord]:
    """The records of a DPR JSON / JSONL file; records without a positive are skipped and
    counted in ``skips`` (``no_positive_ctx``)."""
    path = require_file(path, "DPR data")
    skips = SkipCounter() if skips is None else skips
    json_array = file_format(path, format, DPR_FORMATS, "DPR") == "json"
    records = (json_array_records(path, "DPR records") if json_array
               else jsonl_records(path, skips))
    out = []
    for where, raw in records:
        record = parse_dpr_record(raw, where)
        if not record.positive_ctxs:
            skips.skip("no_positive_ctx", where)
            continue
        out.append(record)
    if not out:
        raise ValueError(f"{path}: no usable DPR record (skipped: {skips.as_dict()})")
    return out


def write_dpr(path: str | os.PathLike, records: Sequence[DprRecord], *,
              format: str = "auto") -> Path:
    """Writes records in DPR's format (a JSON array, or JSONL; gzipped for a .gz name),
    atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    dicts = [r.to_json() for r in records]
    if file_format(path, format, DPR_FORMATS, "DPR") == "json":
        text = "[\n" + ",\n".join(json.dumps(d, ensure_ascii=False) for d in dicts) + "\n]\n"
    else:
        text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dicts)
    if path.suffix == ".gz":
        data = gzip.compress(text.encode("utf-8"), mtime=0)
        atomic_write(path, lambda f: f.write(data), binary=True)
    else:
        atomic_write(path, lambda f: f.write(text))
    return path


# ----------------------------------------------------------------------------- examples


def choose_passages(record: DprRecord, num_hard_negatives: int, rng: np.random.Generator, *,
                    shuffle: bool = True, shuffle_positives: bool = False
                    ) -> tuple[Passage, list[Passage]]:
    """The positive and up to ``num_hard_negatives`` negatives (see the module docstring)."""
    def order(items: Sequence[Passage]) -> list[Passage]:
        items = list(items)
        return [items[i] for i in rng.permutation(len(items))] if shuffle else items

    positives = record.positive_ctxs
    positive = positives[int(rng.integers(len(positives)))] if shuffle_positives else positives[0]
    negatives = order(record.hard_negative_ctxs) + order(record.negative_ctxs)
    return positive, negatives[:num_hard_negatives]


class DprExampleMaker:
    """Tokenizes DPR records into fixed-length rows, in the layout of the corpus embedder's
    rows for DPR stores (`realm_jax.data.rows`): questions ``[CLS] question [SEP]``.

    Args:
      tokenizer: a local Hugging Face folder or a loaded fast tokenizer.
      num_hard_negatives: h, negatives per question.
      question_length, passage_length: row lengths with special tokens (longer texts lose
        their end; a title keeps at most half a passage row).
      title: ``[CLS] title [SEP] text [SEP]`` passages (DPR's ``insert_title``, its default)
        or ``[CLS] text [SEP]``.
      shuffle, shuffle_positives: as :func:`choose_passages`.
    """

    def __init__(self, tokenizer: Any, *, num_hard_negatives: int = 1,
                 question_length: int = 64, passage_length: int = 256, title: bool = True,
                 shuffle: bool = True, shuffle_positives: bool = False):
        if num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {num_hard_negatives}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.special = special_ids(self.tokenizer)
        self.num_hard_negatives = int(num_hard_negatives)
        self.question_length = int(question_length)
        self.passage_length = int(passage_length)
        self.title = bool(title)
        self.shuffle = shuffle
        self.shuffle_positives = shuffle_positives

    def _rows(self, texts: list, length: int, titles: list | None = None
              ) -> dict[str, np.ndarray]:
        """Rows of encoded texts (and titles): ``input_ids``, ``attention_mask`` [N, length]."""
        sp = self.special
        rows = [row(t.ids, length, cls_id=sp.cls, sep_id=sp.sep, pad_id=sp.pad,
                    title_ids=None if titles is None else titles[i].ids)
                for i, t in enumerate(texts)]
        return {"input_ids": np.stack([r[0] for r in rows]).reshape(-1, length),
                "attention_mask": np.stack([r[1] for r in rows]).reshape(-1, length)}

    def question_rows(self, questions: Sequence[str]) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` int32 [len(questions), question_length]."""
        return self._rows(self.tokenizer.encode_batch(list(questions)), self.question_length)

    def passage_rows(self, passages: Sequence[Passage]) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` int32 [len(passages), passage_length]."""
        encode = self.tokenizer.encode_batch
        return self._rows(encode([p.text for p in passages]), self.passage_length,
                          encode([p.title for p in passages]) if self.title else None)

    def example(self, record: DprRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One question's rows: ``question_input_ids`` / ``_attention_mask`` [Q];
        ``passage_input_ids`` / ``_attention_mask`` [1 + h, L] (the positive first);
        ``passage_valid`` bool [1 + h] (False: no negative left for the slot)."""
        positive, negatives = choose_passages(record, self.num_hard_negatives, rng,
                                              shuffle=self.shuffle,
                                              shuffle_positives=self.shuffle_positives)
        n = 1 + self.num_hard_negatives
        q = self.question_rows([record.question])
        p = self.passage_rows([positive] + negatives)
        ids = np.full((n, self.passage_length), self.special.pad, np.int32)
        mask = np.zeros((n, self.passage_length), np.int32)
        ids[:len(negatives) + 1], mask[:len(negatives) + 1] = p["input_ids"], p["attention_mask"]
        return {"question_input_ids": q["input_ids"][0],
                "question_attention_mask": q["attention_mask"][0],
                "passage_input_ids": ids, "passage_attention_mask": mask,
                "passage_valid": np.arange(n) <= len(negatives)}


def collate_dpr(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples: questions [B, Q]; passages flattened to [B * (1 + h), L] and
    ``passage_valid`` [B * (1 + h)], each question's positive then its negatives (the layout
    of `realm_jax.objectives.retrieval.dpr_loss`)."""
    if not examples:
        raise ValueError("no DPR examples to collate")
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    for k in ("passage_input_ids", "passage_attention_mask", "passage_valid"):
        batch[k] = batch[k].reshape(-1, *batch[k].shape[2:])
    return batch


def dpr_dataset(records: Sequence[DprRecord], maker: DprExampleMaker, batch_size: int,
                seed: int, *, process_index: int = 0, process_count: int = 1
                ) -> grain.IterDataset:
    """Batches of DPR examples: the records in a seeded shuffled order repeated forever, the
    passages of each drawn with a per-element seed, this host's share of every global batch
    (whole questions with their passages). The iterator's position (``get_state`` /
    ``set_state``) goes with each checkpoint."""
    if not records:
        raise ValueError("dpr_dataset: no records")
    check_batch_split(batch_size, process_count)
    ds = grain.MapDataset.range(len(records)).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(lambda i, rng: maker.example(records[int(i)], rng), seed=seed)
    ds = ds.to_iter_dataset().batch(batch_size, batch_fn=collate_dpr)
    return host_share(ds, process_index, process_count)
