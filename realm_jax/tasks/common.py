"""Host-side pieces the question-answering tasks share: batches of question indices,
answering in fixed-size padded batches, and evaluation of answers against the references."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, TypeVar

import grain
import jax
import numpy as np

from realm_jax import evaluate
from realm_jax.data.pipeline import check_batch_split, host_share
from realm_jax.tasks.base import Answer

T = TypeVar("T")
R = TypeVar("R")


def question_batches(num_examples: int, batch_size: int, seed: int, *, process_index: int = 0,
                     process_count: int = 1) -> grain.IterDataset:
    """Batches of example indices [batch_size / processes] (this process's share): a seeded
    shuffle, repeated forever; its position (`get_state`) goes with each checkpoint."""
    check_batch_split(batch_size, process_count)
    ds = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(None).to_iter_dataset()
    return host_share(ds.batch(batch_size, batch_fn=lambda xs: np.asarray(xs, np.int64)),
                      process_index, process_count)


def in_padded_batches(items: Sequence[T], batch_size: int,
                      fn: Callable[[list[T]], list[R]]) -> list[R]:
    """`fn` over consecutive batches of exactly `batch_size` items (the last one padded with
    copies of its last item, so one compiled shape serves all), the padding's results
    dropped."""
    if not items:
        raise ValueError("nothing to answer: no questions")
    out: list[R] = []
    for first in range(0, len(items), batch_size):
        chunk = list(items[first:first + batch_size])
        out += fn(chunk + [chunk[-1]] * (batch_size - len(chunk)))[:len(chunk)]
    return out


def evaluate_answers(examples: Sequence, answers: Sequence[Answer], recall_at: Sequence[int],
                     out: str | Path | None = None) -> tuple[dict, str | None]:
    """Exact match of `answers` against the examples' references and recall@k of the
    passages read; the predictions written as JSONL to `out` when given (process 0).
    Returns (evaluate.summarize's figures, the path)."""
    predictions = [evaluate.Prediction.from_retrieval(
        ex, a.answer, ids=[p.id for p in a.passages], titles=[p.title for p in a.passages],
        texts=[p.text for p in a.passages], scores=[p.score for p in a.passages])
        for ex, a in zip(examples, answers)]
    if out is not None and jax.process_index() == 0:
        evaluate.write_predictions(out, predictions)
    return evaluate.summarize(predictions, recall_at), None if out is None else str(out)
