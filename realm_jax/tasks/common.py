"""Host-side pieces the question-answering tasks share: batches of question indices,
answering in fixed-size padded batches, and evaluation of answers against the references
(the figures of `realm-jax eval`, with the metrics `realm-jax score` computes)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

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


DEFAULT_METRICS = evaluate.DEFAULT_SCORE_METRICS
PROVENANCE_METRICS = ("rprec", "recall@")


def scored_examples(examples: Sequence, answers: Sequence[Answer], labels=None
                    ) -> list[evaluate.ScoredExample]:
    """The answers as `evaluate.score` inputs: the generation against the references, the
    retrieved pages' titles against the gold evidence sets (an example's `provenance`, else
    each gold passage alone). With `labels` (a `data.tasks.LabelSet`: FEVER) a generation
    is mapped to the class it names ("" for none) and compared with the example's label."""
    out = []
    for ex, a in zip(examples, answers):
        prediction, references = a.answer or "", tuple(ex.answers)
        if labels is not None:
            prediction, references = labels.label_of(prediction) or "", (ex.label,)
        evidence = tuple(getattr(ex, "provenance", ())) or tuple((g,) for g in ex.gold_passages)
        out.append(evaluate.ScoredExample(ex.question, prediction, references, ex.is_regex,
                                          tuple(p.title for p in a.passages), evidence))
    return out


def task_metrics(examples: Sequence[evaluate.ScoredExample], metrics: Iterable[str]) -> dict:
    """`evaluate.score` of `metrics`, the provenance ones (rprec, recall@K) left out when no
    example has gold evidence."""
    names = evaluate.parse_metrics(metrics)
    if not any(e.evidence for e in examples):
        names = [m for m in names if not m.startswith(PROVENANCE_METRICS)]
    return evaluate.score(examples, names) if names else {}


def evaluate_answers(examples: Sequence, answers: Sequence[Answer], recall_at: Sequence[int],
                     out: str | Path | None = None, metrics: Iterable[str] = DEFAULT_METRICS,
                     labels=None) -> tuple[dict, str | None]:
    """Exact match of `answers` against the examples' references, recall@k of the passages
    read and the task's `metrics` (`task_metrics` of `scored_examples`, `labels` mapping
    generations to classes); the predictions written as JSONL to `out` when given (process
    0). Returns (evaluate.summarize's figures with the metrics, the path)."""
    predictions = [evaluate.Prediction.from_retrieval(
        ex, a.answer, ids=[p.id for p in a.passages], titles=[p.title for p in a.passages],
        texts=[p.text for p in a.passages], scores=[p.score for p in a.passages])
        for ex, a in zip(examples, answers)]
    if out is not None and jax.process_index() == 0:
        evaluate.write_predictions(out, predictions)
    summary = evaluate.summarize(predictions, recall_at)
    summary.update(task_metrics(scored_examples(examples, answers, labels), metrics))
    return summary, None if out is None else str(out)
