"""The one Trainer: every task (`config.task`: realm, orqa, rag, ...) runs through it.

    realm-jax train --config configs/realm.py:tiny --workdir DIR [--stop_after N]

It owns what all tasks share: the mesh and sharding rules, the workdir (config.json,
model.json, checkpoints, metrics), restore-or-init, the jitted sharded step (state donated,
an optional sharded `extras` argument), the next batch prepared in a thread during a step,
metrics (loss, step time, tokens/s, MFU; JSONL and TensorBoard), hooks, checkpoints, the
FINISHED marker and cleanup. What differs between tasks lives in realm_jax/tasks.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import optax

from realm_jax import config as config_lib
from realm_jax import distributed, sharding, tasks
from realm_jax.checkpoints import CheckpointUnreadable, TrainCheckpoints
from realm_jax.tasks.base import Hook, Task
from realm_jax.train.metrics import MetricsWriter, matmul_flops, progress_line
from realm_jax.train.optim import make_optimizer
from realm_jax.train.state import TrainState, abstract_state, create_state, state_shardings
from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)


def train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
               value_and_grad: Callable | None = None) -> Callable:
    """`step(state, batch, extras, rng) -> (state, metrics)` for `loss_fn(params, batch,
    extras, rng) -> (loss, metrics)`: gradients (by `value_and_grad`, same arguments ->
    ((loss, metrics), grads), when given), the optimizer's update, the metrics with the
    gradient norm; the rng (dropout) folded with the step."""
    value_and_grad = value_and_grad or jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch, extras, rng):
        rng = jax.random.fold_in(rng, state.step)
        (_, metrics), grads = value_and_grad(state.params, batch, extras, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), dict(
            metrics, grad_norm=optax.tree.norm(grads))

    return step


def jit_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                   shardings: TrainState, batch_sharding, extras_shardings=None,
                   compiler_options: dict | None = None, value_and_grad: Callable | None = None):
    """The step jitted with its shardings, the state donated: what the Trainer runs and
    what `realm-jax aot` compiles for a topology it does not have."""
    replicated = sharding.replicated(batch_sharding.mesh)
    return jax.jit(train_step(loss_fn, optimizer, value_and_grad),
                   in_shardings=(shardings, batch_sharding, extras_shardings, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0,
                   compiler_options=compiler_options)


class Trainer:
    """Runs `task` (default: the one `config.task` names) in `workdir` until
    `config.train.steps`, resuming from the newest checkpoint. `run()` returns a dict:
    "first" and "last" (the first and last logged step metrics), "first_<hook>" and
    "last_<hook>" for each hook (e.g. "first_eval"), "final_state", "configs", and what the
    task adds (e.g. "snapshot", "swaps")."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path,
                 task: Task | None = None):
        self.config = config
        self.task = task or tasks.get(config.task)(config)
        self.workdir = Workdir(workdir).create()
        self.mesh = sharding.mesh_from_config(config)
        self.rules = sharding.rules_from_config(config)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.hooks: list[Hook] = []
        self.state: TrainState | None = None
        self.resuming = False
        self.saved_step = 0
        _log.info("mesh %s over %d process(es); axes across processes: %s",
                  dict(self.mesh.shape), jax.process_count(),
                  distributed.axes_across_processes(self.mesh) or "none")

    def add_hook(self, fn: Callable[[int, Any], dict | None], *, name: str, every: int = 0,
                 at_start: bool = True, at_end: bool = True) -> None:
        self.hooks.append(Hook(name, fn, every, at_start, at_end))

    def params(self) -> dict:
        return self.state.params

    # ---- set-up

    def _init(self) -> tuple[Any, int]:
        """Model, optimizer, shardings and the state: restored from the newest checkpoint
        (the input pipeline set to its saved position) or new around the task's weights
        (saved as step 0). Returns (the data iterator, the step)."""
        tc, task, workdir = self.config.train, self.task, self.workdir
        configs, host_params = task.build()
        self.checkpoints = TrainCheckpoints(workdir, max_to_keep=tc.keep_checkpoints,
                                            async_save=tc.async_checkpoints)
        start = self.checkpoints.latest_step()
        self.resuming = start is not None
        if self.resuming and workdir.has_model():
            workdir.check_model(configs, allow=tuple(tc.allow_model_changes))
        workdir.write_model(configs)
        workdir.write_config(self.config)
        self.configs = configs
        self.optimizer = make_optimizer(tc, task.lr_multipliers())
        self.param_shardings = task.param_shardings(configs, self.mesh, self.rules)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_params)
        self.shardings = state_shardings(self.optimizer, abstract, self.param_shardings,
                                         self.mesh)
        data = iter(task.dataset(self))
        if start is None:
            self.state = create_state(self.optimizer,
                                      sharding.place(host_params, self.shardings.params),
                                      self.shardings)
            self._save(0, data.get_state())
            start = 0
            _log.info("initialised a new run in %s", workdir.root)
        else:
            start, meta = self._restore(abstract_state(self.optimizer, abstract, self.shardings))
            if start < tc.steps:
                workdir.clear_finished()
            data.set_state(meta["data"])
            _log.info("resumed %s at step %d", workdir.root, start)
        self.saved_step = start
        return data, start

    def _restore(self, target) -> tuple[int, dict]:
        """The newest checkpoint that restores whole, into self.state: (its step, its meta).
        Newer ones that do not restore (files lost or cut short) are set aside with a
        warning, not deleted, once an older one has restored: when none does, the fault is
        not the files' (e.g. another model) and the newest one's error is raised."""
        unreadable = []
        for step in reversed(self.checkpoints.all_steps()):
            try:
                self.state, meta = self.checkpoints.restore(step, target)
            except CheckpointUnreadable as e:
                unreadable.append((step, e))
                continue
            for bad, e in unreadable:
                _log.warning("%s; set aside as %s, resuming from checkpoint %d", e,
                             self.checkpoints.set_aside(bad), step)
            return step, meta
        raise unreadable[0][1]

    def _save(self, step: int, data_state) -> None:
        self.checkpoints.save(step, self.state.params,
                              train_state={"step": self.state.step,
                                           "opt_state": self.state.opt_state},
                              meta={"data": data_state, **self.task.checkpoint_meta()})
        self.saved_step = step

    # ---- the loop

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until `config.train.steps`, or stop (with a checkpoint, the run not marked
        finished, as a preempted run) once `stop_after` is reached; a later run resumes. The
        learning-rate schedule runs to `train.steps` either way."""
        tc, task = self.config.train, self.task
        data, start = self._init()
        task.start(self)
        hooks = task.hooks(self) + self.hooks
        extras = task.extras()
        step_fn = jit_train_step(
            task.loss, self.optimizer, self.shardings, self.batch_sharding,
            jax.tree.map(lambda x: x.sharding, extras),
            compiler_options=config_lib.compiler_options(self.config),
            value_and_grad=task.value_and_grad)
        rng = jax.random.key(self.config.seed)
        tokens = task.tokens_per_step()
        peak = tc.peak_flops_per_device * jax.device_count()
        writer = MetricsWriter(self.workdir.root)
        pool = concurrent.futures.ThreadPoolExecutor(1)

        def fetch():  # the next item, prepared while a step runs
            item = next(data)
            return task.load(item), data.get_state()

        end = tc.steps if stop_after is None else max(start, min(tc.steps, int(stop_after)))
        result: dict[str, Any] = {"first": None, "last": None}
        for hook in hooks:
            result[f"first_{hook.name}"] = result[f"last_{hook.name}"] = None

        def run_hook(hook: Hook, step: int) -> None:
            with sharding.activate(self.mesh, self.rules):
                values = hook.fn(step, self.state.params)
            if values is None:
                return
            writer.write(step, values)
            if jax.process_index() == 0:
                shown = {k: values[k] for k in (hook.shown or values) if k in values}
                print(progress_line(step, tc.steps, shown), flush=True)
            values = dict(values, step=step)
            result[f"first_{hook.name}"] = result[f"first_{hook.name}"] or values
            result[f"last_{hook.name}"] = values

        flops = None
        step = start
        pending = pool.submit(fetch)
        try:
            for hook in hooks:
                if hook.at_start:
                    run_hook(hook, step)
            while step < end:
                task.before_step(step, self)
                item, data_state = pending.result()
                pending = pool.submit(fetch)
                with sharding.activate(self.mesh, self.rules):
                    t_host = time.perf_counter()
                    batch, host_metrics = task.make_batch(item, self.state.params)
                    host_seconds = time.perf_counter() - t_host
                    extras = task.extras()
                    if flops is None:
                        flops = matmul_flops(step_fn, self.state, batch, extras, rng)
                    logged = (step + 1) % tc.log_every == 0 or step + 1 in (start + 1, end)
                    if logged:  # steps run asynchronously: time this one alone
                        jax.block_until_ready(self.state)
                    t0 = time.perf_counter()
                    self.state, metrics = step_fn(self.state, batch, extras, rng)
                    step += 1
                    if logged:
                        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        seconds = time.perf_counter() - t0
                        values.update(step_time=seconds, host_time=host_seconds,
                                      mfu=flops / seconds / peak, **task.step_metrics(step))
                        if tokens:
                            values["tokens_per_s"] = tokens / seconds
                        if host_metrics is not None:
                            values.update(host_metrics())
                        if jax.process_index() == 0:
                            print(progress_line(step, tc.steps, {
                                k: values[k] for k in task.progress_keys if k in values}),
                                flush=True)
                        result["first"] = result["first"] or dict(values, step=step)
                        result["last"] = dict(values, step=step)
                        writer.write(step, values)
                for hook in hooks:
                    if hook.due(step, end):
                        run_hook(hook, step)
                if step % tc.checkpoint_every == 0 or step == end:
                    self._save(step, data_state)
            if step >= tc.steps:
                self.checkpoints.mark_finished()
            else:
                _log.info("stopped at step %d of %d; resume with the same workdir", step,
                          tc.steps)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            writer.close()
            self.checkpoints.wait_until_finished()
        return dict(result, final_state=self.state, configs=self.configs, **task.result())


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run `config.task` in `workdir` (see `Trainer.run`)."""
    return Trainer(config, workdir).run(stop_after)
