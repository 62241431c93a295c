"""The REALM trainer: one jitted, sharded step; orbax checkpoints the refresher reads;
index snapshots swapped in at step boundaries; metrics; a resumable input pipeline.

    realm-jax train --config configs/realm.py:tiny --workdir DIR
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import distributed, sharding
from realm_jax.data.realm_examples import QueryMaker
from realm_jax.data.store import BlockStore
from realm_jax.index.store import IndexStore, SnapshotWatcher
from realm_jax.train import heldout, loop, realm
from realm_jax.train.checkpoints import TrainCheckpoints
from realm_jax.train.metrics import MetricsWriter, progress_line
from realm_jax.train.optim import make_optimizer
from realm_jax.train.state import TrainState, state_shardings

_log = logging.getLogger(__name__)


def wait_for_newer_snapshot(watcher: SnapshotWatcher, current, timeout: float):
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


def jit_train_step(loss_fn, optimizer: optax.GradientTransformation, shardings: TrainState,
                   batch_sharding: NamedSharding, corpus_shardings=None):
    """The REALM train step (state, batch, corpus arrays or None, rng) -> (state, metrics),
    jitted with its shardings, the state donated: what the trainer runs, and what
    `realm-jax aot` compiles for a topology it does not have."""
    def train_step(state: TrainState, batch, corpus_arrays, rng):
        rng = jax.random.fold_in(rng, state.step)
        (_, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, corpus_arrays, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state), metrics

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(train_step, in_shardings=(shardings, batch_sharding, corpus_shardings,
                                             replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train until `config.train.steps`. Returns a dict: "first" and "last" (the first and
    last logged metrics), "first_eval" and "last_eval" (the held-out evaluation at the start
    and at the end of this run, None without held-out queries), "final_state", "configs",
    "snapshot" (the index in use at the end), "swaps" (the snapshots swapped in).

    `stop_after`: stop once this step is reached (with a checkpoint, the run not marked
    finished), as a preempted run would; a later call resumes it. The learning-rate
    schedule still runs to `train.steps`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc, rc = config.train, config.retrieval
    if rc.mode not in ("device", "scann"):
        raise ValueError(f"--config.retrieval.mode={rc.mode!r}: expected 'device' or 'scann'")
    mesh = sharding.mesh_from_config(config)
    rules = sharding.rules_from_config(config)
    _log.info("mesh %s over %d process(es); axes across processes: %s", dict(mesh.shape),
              jax.process_count(), distributed.axes_across_processes(mesh) or "none")
    if not config.data.corpus or not config.data.tokenizer:
        raise ValueError("set --config.data.corpus (a block store from `realm-jax "
                         "prepare-corpus`) and --config.data.tokenizer (its HF tokenizer folder)")
    store = BlockStore.open(config.data.corpus)
    maker = QueryMaker.for_store(store, config.data.tokenizer, query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    configs, host_params = realm.build_models(config)
    checkpoints = TrainCheckpoints(workdir, max_to_keep=tc.keep_checkpoints,
                                   async_save=tc.async_checkpoints)
    checkpoints.write_model_configs(configs)
    optimizer = make_optimizer(tc)
    p_shardings = realm.param_shardings(configs, mesh, rules)
    shardings = state_shardings(optimizer, realm.abstract_params(configs), p_shardings, mesh)
    train_blocks, heldout_blocks = heldout.split_blocks(
        store, config.data.get("heldout_fraction", 0.0))
    eval_queries = int(tc.get("eval_queries", 0))
    answerable_only = bool(config.data.get("answerable_only", False))
    # Which queries retrieval could help: for data.answerable_only and the held-out figures
    # over those queries (skipped on a corpus too large to search).
    finder = (realm.AnswerFinder(store, rc.exclude) if answerable_only or (
        eval_queries > 0 and len(heldout_blocks) and realm.AnswerFinder.fits(store)) else None)
    dataset = realm.query_dataset(store, maker, tc.batch_size, config.seed,
                                  block_ids=train_blocks, keep=finder if answerable_only else None,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    batches = iter(dataset)

    resuming = checkpoints.latest_step() is not None
    state, start = loop.restore_or_init(checkpoints, optimizer, shardings,
                                        realm.abstract_params(configs), host_params, batches,
                                        tc.steps)
    if resuming:
        _log.info("resumed %s at step %d", workdir, start)
    else:
        _log.info("initialised a new run in %s", workdir)
    del host_params

    index_dir = workdir / "index"
    watcher = distributed.shared_watcher(  # one swap decision for all processes
        SnapshotWatcher(IndexStore(index_dir), expected_corpus_fingerprint=store.fingerprint))
    snapshot = loop.wait_for_snapshot(watcher, tc.index_wait_seconds, index_dir)

    loss_fn = realm.RealmLossFn.from_config(rc, configs, maker.special, num_valid=len(store))
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def use_snapshot(snap):
        if rc.mode == "device":
            with sharding.activate(mesh, rules):
                return realm.device_corpus(snap, store, rc.block_length, mesh,
                                           loss_fn.block_size), None
        checkpoints.pin(snap.step)  # its query tower embeds the queries, now and on resume
        steps = checkpoints.all_steps()
        if snap.step in steps:
            query_params = checkpoints.restore_part(snap.step, "query_tower")
        else:  # an index from pretrained weights, or its checkpoint was lost
            _log.warning("checkpoint %d of snapshot %s is gone: embedding queries with the "
                         "live query tower", snap.step, snap.version)
            query_params = jax.device_get(state.params["query_tower"])
        return None, realm.HostRetriever.from_config(rc, snap, configs["query_tower"],
                                                     query_params, store)

    corpus, retriever = use_snapshot(snapshot)
    _log.info("using index %s (checkpoint step %d)", snapshot.version, snapshot.step)

    def corpus_arrays():
        return corpus.arrays() if corpus is not None else None

    corpus_shardings = (jax.tree.map(lambda x: x.sharding, corpus.arrays())
                        if corpus is not None else None)
    step_fn = jit_train_step(loss_fn, optimizer, shardings, batch_sharding, corpus_shardings)
    rng = jax.random.key(config.seed)

    evaluator = None
    if eval_queries > 0 and len(heldout_blocks):
        queries = heldout.heldout_queries(store, maker, heldout_blocks, eval_queries, config.seed)
        if queries:
            evaluator = heldout.HeldoutEval(
                loss_fn, queries, mesh=mesh, param_shardings=shardings.params,
                corpus_shardings=corpus_shardings,
                baseline_file=workdir / heldout.BASELINE_FILE, resume=resuming,
                finder=finder, batch_size=int(tc.get("eval_batch_size", 64)))
            _log.info("held-out evaluation: %d masked queries from %d held-out blocks (%s "
                      "answerable)", len(queries), len(heldout_blocks),
                      "?" if finder is None else evaluator.answerable.sum())
    if evaluator is None:
        _log.info("no held-out evaluation (data.heldout_fraction=%s, train.eval_queries=%d, "
                  "%d held-out blocks)", config.data.get("heldout_fraction", 0.0),
                  eval_queries, len(heldout_blocks))
    eval_every = int(tc.get("eval_every", 0))

    def evaluate(at_step: int) -> dict:
        with sharding.activate(mesh, rules):
            values = evaluator(state.params, corpus_arrays(), retriever, step=at_step)
        values.update(step=at_step, index_step=snapshot.step)
        if jax.process_index() == 0:
            shown = {k: values[k] for k in ("heldout_loss", "heldout_retrieval_utility",
                                             "heldout_retrieval_utility_change",
                                             "heldout_retrieval_utility_change_se",
                                             "heldout_answerable_retrieval_utility",
                                             "heldout_answerable_retrieval_utility_change",
                                             "heldout_answer_recall")
                     if k in values}
            print(progress_line(at_step, tc.steps, shown), flush=True)
        return values

    end = loop.end_step(start, tc.steps, stop_after)
    max_staleness = int(tc.get("max_index_staleness", 0))
    saved_step = start

    def prepare(local):
        if retriever is not None:
            local = retriever(local)
        fields = realm.QUERY_FIELDS + (realm.CANDIDATE_FIELDS if retriever is not None else ())
        return loop.global_batch({k: local[k] for k in fields}, batch_sharding)

    pool = concurrent.futures.ThreadPoolExecutor(1)  # the next batch is prepared during a step

    def fetch():
        local = next(batches)
        return local, batches.get_state()

    pending = pool.submit(fetch)
    writer = MetricsWriter(workdir)
    flops = None
    log_every = tc.log_every
    first = last = first_eval = last_eval = None
    swaps: list[dict] = []
    step = start
    try:
        if evaluator is not None:
            first_eval = last_eval = evaluate(step)
            writer.write(step, {k: v for k, v in first_eval.items() if k != "step"})
        while step < end:
            new = watcher.poll()
            if (new is None and max_staleness and snapshot.staleness(step) >= max_staleness
                    and saved_step > snapshot.step):
                # Bounded staleness (opt-in): wait for the refresher to index a newer
                # checkpoint; after index_wait_seconds, go on with the stale index.
                _log.info("index %s is %d steps stale (train.max_index_staleness=%d): waiting "
                          "for a newer one", snapshot.version, snapshot.staleness(step),
                          max_staleness)
                new = wait_for_newer_snapshot(watcher, snapshot, tc.index_wait_seconds)
            if new is not None:
                snapshot = new
                corpus, retriever = use_snapshot(snapshot)
                swaps.append({"step": step, "index": snapshot.version,
                              "checkpoint_step": snapshot.step})
                _log.info("swapped in index %s (checkpoint step %d) at step %d",
                          snapshot.version, snapshot.step, step)
            local, data_state = pending.result()
            with sharding.activate(mesh, rules):
                batch = prepare(local)
                pending = pool.submit(fetch)
                if flops is None:
                    compiled = step_fn.lower(state, batch, corpus_arrays(), rng).compile()
                    flops = loop.step_flops(compiled)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch, corpus_arrays(), rng)
                step += 1
                eval_due = evaluator is not None and (
                    step == end or (eval_every > 0 and step % eval_every == 0))
                if step % log_every == 0 or step == end or step == start + 1 or eval_due:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    seconds = time.perf_counter() - t0
                    reader_tokens = tc.batch_size * rc.num_candidates * (rc.query_length + rc.block_length)
                    values.update(
                        staleness=float(snapshot.staleness(step)),
                        index_step=float(snapshot.step), step_time=seconds,
                        reader_tokens_per_s=reader_tokens / seconds,
                        mfu=flops / seconds / (tc.peak_flops_per_device * jax.device_count()))
                    if jax.process_index() == 0:
                        print(progress_line(step, tc.steps, {k: values[k] for k in (
                            "loss", "retrieval_utility", "staleness", "step_time", "mfu")}),
                            flush=True)
                    first = first or dict(values, step=step)
                    last = dict(values, step=step)
                    if eval_due:
                        last_eval = evaluate(step)
                        values.update({k: v for k, v in last_eval.items()
                                       if k.startswith(heldout.PREFIX)})
                    writer.write(step, values)
            if step % tc.checkpoint_every == 0 or step == end:
                loop.save(checkpoints, step, state, data_state, index=snapshot.version)
                saved_step = step
        loop.finish(checkpoints, step, tc.steps)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        writer.close()
        checkpoints.wait_until_finished()
    return {"first": first, "last": last, "first_eval": first_eval, "last_eval": last_eval,
            "final_state": state, "configs": configs, "snapshot": snapshot, "swaps": swaps}


def predict_examples(config: ml_collections.ConfigDict, workdir: str | Path, params,
                     num: int = 4, seed: int = 1) -> list[dict]:
    """Masked queries (from a pipeline with another seed), the blocks the newest index and
    `params` retrieve for them, and the tokens the reader predicts: for showing a run."""
    rc = config.retrieval
    store = BlockStore.open(config.data.corpus)
    maker = QueryMaker.for_store(store, config.data.tokenizer, query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    configs = TrainCheckpoints(workdir).model_configs()
    snapshot = IndexStore(Path(workdir) / "index").latest()
    params = jax.device_get(params)
    retriever = realm.HostRetriever.from_config(rc, snapshot, configs["query_tower"],
                                                params["query_tower"], store)
    loss_fn = realm.RealmLossFn.from_config(rc, configs, maker.special, mode="scann")
    queries = [q for q, _ in zip(maker.iter_store(store, np.random.default_rng(seed).permutation(
        len(store)), seed=seed), range(num))]
    from realm_jax.data.realm_examples import collate_queries
    batch = retriever(collate_queries(queries))
    fields = realm.QUERY_FIELDS + realm.CANDIDATE_FIELDS
    out = jax.device_get(jax.jit(loss_fn.predict)(params, {k: batch[k] for k in fields}, None))
    tokenizer = maker.tokenizer.backend
    rows = []
    for i, q in enumerate(queries):
        valid = q.mask_valid
        rows.append({
            "sentence": q.sentence, "masked": q.span_text,
            "predicted": tokenizer.decode([int(t) for t in out["predicted"][i][valid]]),
            "retrieved": [(store.title(int(c)) if c >= 0 else "(null document)", float(p))
                          for c, p in zip(out["cand_ids"][i], out["retrieval_probs"][i])],
        })
    return rows
