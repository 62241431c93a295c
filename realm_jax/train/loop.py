"""Pieces the trainers' loops share: starting or resuming a run from its checkpoints, saving
a step, and the experiment config kept in the workdir (for `realm-jax eval` / `answer`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import optax

from realm_jax import sharding
from realm_jax.train.checkpoints import FINISHED, TrainCheckpoints, _atomic_write_text
from realm_jax.train.state import TrainState, abstract_state, create_state

CONFIG_JSON = "config.json"


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
        _atomic_write_text(Path(workdir) / CONFIG_JSON, config.to_json_best_effort(indent=2) + "\n")


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The experiment config a trainer wrote to WORKDIR/config.json."""
    path = Path(workdir) / CONFIG_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; `realm-jax train` writes the run's config "
                                "there (or pass --config)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
