"""What a task is: the pieces of REALM, ORQA or RAG that the one Trainer runs.

A task is a class registered under the name a config gives as `config.task`. The Trainer
(realm_jax/train/trainer.py) owns everything common (mesh, workdir, restore-or-init, the
jitted sharded step, prefetch, metrics, checkpoints, hooks); a task supplies (the methods of
`Task`) its parts and their weights, its data (host items, then global batches), its pure
loss, its hooks and its answerer for `realm-jax eval` and `answer`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Protocol, Sequence

import ml_collections

from realm_jax import sharding
from realm_jax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(step, params) -> dict of floats or None`, run by the Trainer at the start of a
    run (`at_start`), every `every` steps (0: never) and at its end. The values are logged
    as their own metrics row; `shown` are the ones printed (None: all)."""

    name: str
    fn: Callable[[int, Any], dict | None]
    every: int = 0
    at_start: bool = True
    at_end: bool = True
    shown: tuple[str, ...] | None = None

    def due(self, step: int, end: int) -> bool:
        return step == end and self.at_end or self.every > 0 and step % self.every == 0


class Run(Protocol):
    """What the Trainer shows a task once the run's state exists."""

    config: ml_collections.ConfigDict
    workdir: Workdir
    mesh: Any
    rules: Any
    checkpoints: Any          # realm_jax.checkpoints.TrainCheckpoints
    configs: dict             # {part: model config}
    param_shardings: dict     # {part: NamedShardings}
    batch_sharding: Any
    resuming: bool
    saved_step: int           # the newest step checkpointed by this run (or restored)

    def params(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Passage:
    id: int
    title: str
    text: str
    score: float


@dataclasses.dataclass(frozen=True)
class Answer:
    """A question's answer ("" when there is none), its score, and the passages retrieved,
    best first, of which the first `read` were read (None: all); `source` indexes the passage
    the answer was read from (-1: not one passage)."""

    question: str
    answer: str
    score: float
    passages: tuple[Passage, ...]
    source: int = -1
    read: int | None = None


class Answerer(Protocol):
    """A trained run, ready to answer (`realm-jax answer`) and evaluate (`realm-jax eval`)."""

    def answer(self, questions: Sequence[str]) -> list[Answer]: ...

    def evaluate(self, out: str | None = None) -> tuple[dict, str]:
        """(the metrics on the config's eval data, the predictions file written)."""


class Task(abc.ABC):
    """A training task (see the module docstring). One instance per run."""

    name: ClassVar[str]
    # The logged values printed on a step's progress line.
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "step_time")

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # ---- the model

    @abc.abstractmethod
    def build(self) -> tuple[dict, dict]:
        """({part: model config}, {part: host params}): the weights a new run starts from."""

    def model_configs(self) -> dict:
        """The parts' model configs, without making weights where the task can (for
        ahead-of-time compilation)."""
        return self.build()[0]

    def param_shardings(self, configs: dict, mesh, rules) -> dict:
        """NamedShardings of the params `build()` gives (default: one subtree per part)."""
        return sharding.part_shardings(configs, mesh, rules)

    def lr_multipliers(self) -> dict:
        """{part: learning-rate factor} added to `train.lr_multipliers`."""
        return {}

    # ---- data and the step

    @abc.abstractmethod
    def dataset(self, run: Run):
        """An iterable of host items, this process's share of each global batch; its
        iterator's position (`get_state` / `set_state`) is saved with every checkpoint.
        Called before the state exists (`run.params()` is not there yet)."""

    def load(self, item):
        """Host work on an item that needs no parameters (runs ahead, in the prefetch
        thread)."""
        return item

    @abc.abstractmethod
    def start(self, run: Run) -> None:
        """Open what the steps need (index, retrievers, evaluators) once the state exists."""

    @abc.abstractmethod
    def make_batch(self, item, params) -> tuple[dict, Callable[[], dict] | None]:
        """(the global batch of `item`, a function giving host metrics of it or None),
        with the live `params` (e.g. for retrieval)."""

    @abc.abstractmethod
    def loss(self, params, batch: dict, extras, rng) -> tuple[Any, dict]:
        """(scalar loss, metrics): pure, jitted inside the step; dropout when `rng`;
        `extras` as `extras()` gives them."""

    # Optional: `(params, batch, extras, rng) -> ((loss, metrics), grads)`, equal to
    # `jax.value_and_grad(self.loss, has_aux=True)` but computed the task's way (e.g. chunk
    # by chunk); None: the step differentiates `loss`. Set by `build()` at the latest.
    value_and_grad: Callable | None = None

    def extras(self):
        """Sharded arrays the step receives besides the batch, e.g. the corpus embeddings
        and tokens (None: nothing)."""
        return None

    def before_step(self, step: int, run: Run) -> None:
        """Called before each step (e.g. to swap in a newer index)."""

    def step_metrics(self, step: int) -> dict:
        """Host values logged with the metrics of the step that reached `step`."""
        return {}

    def tokens_per_step(self) -> int:
        """Tokens a step processes (for tokens/s); 0: not reported."""
        return 0

    def hooks(self, run: Run) -> list[Hook]:
        return []

    def checkpoint_meta(self) -> dict:
        """JSON facts saved with each checkpoint."""
        return {}

    def result(self) -> dict:
        """Entries the task adds to the Trainer's result."""
        return {}

    @staticmethod
    def summary(result: dict, keys: Sequence[str] = ("loss",)) -> str | None:
        """One line on a finished run, for `realm-jax train`: `keys` at its first and last
        logged steps."""
        first, last = result.get("first"), result.get("last")
        if first and last:
            return (", ".join(f"{k} {first[k]:.4f} -> {last[k]:.4f}" for k in keys)
                    + f" (steps {first['step']} -> {last['step']})")
        return None

    # ---- answering

    @classmethod
    def answerer(cls, config: ml_collections.ConfigDict, workdir: str,
                 step: int | None = None) -> Answerer:
        raise ValueError(f"config.task={cls.name!r}: `realm-jax eval` and `answer` run "
                         "question-answering runs (orqa, rag)")


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}: expected one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
