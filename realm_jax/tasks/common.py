"""Pieces the tasks share: a part's module applied with or without dropout, the retriever
tower of a config's sizes, batches of question indices, answering in fixed-size padded
batches, evaluation of answers against the references (the figures of `realm-jax eval`,
with the metrics `realm-jax score` computes), and the base of the tasks that serve an index
snapshot, swapping in the newest one at step boundaries (IndexTask, QATask)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import grain
import jax
import ml_collections
import numpy as np

from realm_jax import config as config_lib
from realm_jax import distributed, evaluate
from realm_jax.data.pipeline import check_batch_split, host_share
from realm_jax.data.store import BlockStore
from realm_jax.models import EmbedderConfig
from realm_jax.tasks.base import Answer, Task

_log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def apply_model(cfg, params, *args, rng: jax.Array | None = None):
    """The module of model config `cfg` with `params` over `args`; dropout on when `rng`."""
    kwargs = {"rngs": {"dropout": rng}, "deterministic": False} if rng is not None else {}
    return cfg.module().apply({"params": params}, *args, **kwargs)


# `apply_model` jitted (the config static), e.g. a tower's embeddings of ids and masks.
jit_apply = jax.jit(apply_model, static_argnums=0)


def tower_config(m: ml_collections.ConfigDict) -> EmbedderConfig:
    """A retriever tower of `model.encoder`'s sizes, `model.pooling` and a
    `model.retriever_proj_size` projection (0: none)."""
    proj = m.retriever_proj_size or None
    return EmbedderConfig(config_lib.encoder_config(m.encoder), pooling=m.pooling,
                          projection_dim=proj, projection_layer_norm=bool(proj))


def open_corpus(config: ml_collections.ConfigDict, tokenizer: bool = False,
                what: str = "a block store from `realm-jax prepare-corpus`") -> BlockStore:
    """The block store `data.corpus` (`what` it must be named when unset); with `tokenizer`
    `data.tokenizer` must be set too."""
    if not config.data.corpus or (tokenizer and not config.data.tokenizer):
        raise ValueError(f"set --config.data.corpus ({what})" + (
            " and --config.data.tokenizer (its HF tokenizer folder)" if tokenizer else ""))
    return BlockStore.open(config.data.corpus)


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


@dataclasses.dataclass
class SnapshotSwaps:
    """Which index snapshot a run serves, and when a newer one comes in: `swap_if_due(step,
    saved_step, use)` at each step boundary calls `use` with the newer snapshot the
    refresher published, if any. With `max_staleness` (opt-in bounded staleness) the trainer
    waits, up to `wait_seconds`, for an index of a newer checkpoint once the served one is
    that many steps behind and a newer checkpoint exists. Every swap is recorded in `swaps`."""

    watcher: object          # index.store.SnapshotWatcher
    snapshot: object         # the served index.store.Snapshot
    max_staleness: int = 0
    wait_seconds: float = 0.0
    swaps: list = dataclasses.field(default_factory=list)

    def swap_if_due(self, step: int, saved_step: int, use: Callable[[object], None]) -> None:
        new = self.watcher.poll()
        limit = self.max_staleness
        if (new is None and limit and self.snapshot.staleness(step) >= limit
                and saved_step > self.snapshot.step):
            _log.info("index %s is %d steps stale (train.max_index_staleness=%d): waiting "
                      "for a newer one", self.snapshot.version, self.snapshot.staleness(step),
                      limit)
            new = wait_for_newer_snapshot(self.watcher, self.snapshot, self.wait_seconds)
        if new is not None:
            self.snapshot = new
            self.swaps.append({"step": step, "index": new.version, "checkpoint_step": new.step})
            _log.info("swapped in index %s (checkpoint step %d) at step %d", new.version,
                      new.step, step)
            use(new)

    def step_metrics(self, step: int) -> dict:
        return {"staleness": float(self.snapshot.staleness(step)),
                "index_step": float(self.snapshot.step)}


class IndexTask(Task):
    """A task that serves an index snapshot (REALM, ORQA, RAG): `self.index` (SnapshotSwaps)
    follows the refresher's snapshots, a newer one swapped in by `serve(snapshot)` at a step
    boundary when the task `refreshes` (ORQA and RAG: `retrieval.strategy="refresh"`); the
    served snapshot's staleness is logged, its version saved with each checkpoint, and it
    and the swaps are returned with the run's result."""

    index: SnapshotSwaps | None = None

    @property
    def refreshes(self) -> bool:
        return self.config.retrieval.strategy == "refresh"

    def serve(self, snapshot) -> None:
        """Put `snapshot` in use for the following steps."""
        raise NotImplementedError

    def follow(self, watcher, snapshot) -> None:
        """Follow `watcher` from the served `snapshot` on (`train.max_index_staleness`,
        `train.index_wait_seconds`)."""
        tc = self.config.train
        self.index = SnapshotSwaps(watcher, snapshot, tc.max_index_staleness,
                                   tc.index_wait_seconds)

    def serve_first(self, workdir, watcher) -> None:
        """Serve the first snapshot `watcher` gives (waiting up to `train.index_wait_seconds`
        for the refresher), then follow it."""
        snapshot = workdir.wait_for_snapshot(watcher, self.config.train.index_wait_seconds)
        self.serve(snapshot)
        self.follow(watcher, snapshot)

    def before_step(self, step: int, run) -> None:
        if self.refreshes:
            self.index.swap_if_due(step, run.saved_step, self.serve)

    def step_metrics(self, step: int) -> dict:
        return self.index.step_metrics(step)

    def checkpoint_meta(self) -> dict:
        return {} if self.index is None else {"index": self.index.snapshot.version}

    def result(self) -> dict:
        return {"snapshot": self.index.snapshot, "swaps": self.index.swaps}


class QATask(IndexTask):
    """An IndexTask trained on question-answer examples (ORQA, RAG): `self.examples`, drawn
    in `question_batches`, an item being (the examples, `encode(their questions)`)."""

    examples: list

    def encode(self, questions: Sequence[str]):
        raise NotImplementedError

    def question_dataset(self) -> grain.IterDataset:
        return question_batches(len(self.examples), self.config.train.batch_size,
                                self.config.seed, process_index=jax.process_index(),
                                process_count=jax.process_count())

    def load(self, indices):
        chosen = [self.examples[int(i)] for i in indices]
        return chosen, self.encode([ex.question for ex in chosen])


def wait_for_newer_snapshot(watcher, current, timeout: float):
    """A snapshot newer than `current`, or None after `timeout` seconds (training goes on
    with the one it has: the refresher may be dead)."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = watcher.poll()
        if snapshot is not None:
            return snapshot
        if distributed.agree(time.monotonic() > deadline):
            _log.warning("no index newer than %s (checkpoint step %d) after %.0fs: training "
                         "on with it", current.version, current.step, timeout)
            return None
        time.sleep(0.2)
