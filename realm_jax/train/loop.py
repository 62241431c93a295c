"""Pieces the trainers' loops share: starting or resuming a run from its checkpoints, saving
a step, finishing, the first index, global batches, step FLOPs, and the experiment config
kept in the workdir (for `realm-jax eval` / `answer`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from realm_jax import distributed, sharding
from realm_jax.index.store import SnapshotWatcher
from realm_jax.durable import atomic_write_text
from realm_jax.train.checkpoints import FINISHED, TrainCheckpoints
from realm_jax.train.state import TrainState, abstract_state, create_state

CONFIG_JSON = "config.json"
_log = logging.getLogger(__name__)


def global_batch(local: dict, batch_sharding: NamedSharding) -> dict:
    """Global arrays of `batch_sharding` from this process's rows of each field."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in local.items()}


def wait_for_snapshot(watcher: SnapshotWatcher, timeout: float, index_dir: Path):
    """The first snapshot the watcher sees, waiting up to `timeout` seconds (one decision
    for all processes)."""
    deadline = time.monotonic() + timeout
    logged = False
    while True:
        snapshot = watcher.poll()
        if snapshot is not None:
            return snapshot
        if distributed.agree(time.monotonic() > deadline):
            raise TimeoutError(
                f"no index snapshot in {index_dir} after {timeout:.0f}s: start the refresher "
                f"(realm-jax refresh --config ... --workdir {index_dir.parent}) or build a "
                "first index with --from_hf")
        if not logged:
            _log.info("waiting for the refresher to publish a first index in %s", index_dir)
            logged = True
        time.sleep(1.0)


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled step, from XLA's cost analysis (0 if unknown)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def restore_or_init(checkpoints: TrainCheckpoints, optimizer: optax.GradientTransformation,
                    shardings: TrainState, params_abstract, host_params, data,
                    total_steps: int) -> tuple[TrainState, int]:
    """(state, step) to train from: the newest checkpoint restored onto `shardings` (and the
    input pipeline `data` set to its saved position), or a fresh state around `host_params`
    saved as step 0. A finished run asked for more steps loses its FINISHED marker."""
    start = checkpoints.latest_step()
    if start is None:
        state = create_state(optimizer, sharding.place(host_params, shardings.params), shardings)
        save(checkpoints, 0, state, data.get_state())
        return state, 0
    if start < total_steps:
        (checkpoints.directory / FINISHED).unlink(missing_ok=True)
    state, meta = checkpoints.restore(start, abstract_state(optimizer, params_abstract, shardings))
    data.set_state(meta["data"])
    return state, start


def save(checkpoints: TrainCheckpoints, step: int, state: TrainState, data_state: Any,
         **meta) -> None:
    """A checkpoint of `state` at `step`, with the input pipeline's position and `meta`."""
    checkpoints.save(step, state.params,
                     train_state={"step": state.step, "opt_state": state.opt_state},
                     meta={"data": data_state, **meta})


def end_step(start: int, total_steps: int, stop_after: int | None) -> int:
    """The step this run stops at: `total_steps`, or `stop_after` (`train --stop_after`)
    when that comes first, never before `start`."""
    return total_steps if stop_after is None else max(start, min(total_steps, int(stop_after)))


def finish(checkpoints: TrainCheckpoints, step: int, total_steps: int) -> None:
    """At the end of a loop: the run marked finished (the refresher stops) when it reached
    `total_steps`; otherwise left resumable."""
    if step >= total_steps:
        checkpoints.mark_finished()
    else:
        _log.info("stopped at step %d of %d (stop_after); resume with the same workdir",
                  step, total_steps)


def train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """`step(state, batch, rng) -> (state, metrics)` for `loss_fn(params, batch, rng) ->
    (loss, metrics)`: gradients, the optimizer's update, the metrics with the gradient norm;
    the rng (dropout) folded with the step."""
    def step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), dict(
            metrics, grad_norm=optax.tree.norm(grads))

    return step


def write_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """WORKDIR/config.json: the experiment config of the run (process 0 writes it)."""
    if jax.process_index() == 0:
        atomic_write_text(Path(workdir) / CONFIG_JSON, config.to_json_best_effort(indent=2) + "\n")


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The experiment config a trainer wrote to WORKDIR/config.json."""
    path = Path(workdir) / CONFIG_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; `realm-jax train` writes the run's config "
                                "there (or pass --config)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
