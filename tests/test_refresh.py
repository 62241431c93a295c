"""The trainer's checkpoint contract (TrainCheckpoints) and the refresher process
(realm_jax.refresh): newest-checkpoint selection, partial restore of the document tower,
the loop until FINISHED, --from_hf, resuming, several workers, the CLI, and SIGKILL at
random moments."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import struct

from realm_jax import cli, hf
from realm_jax.data import BlockStore, prepare_corpus
from realm_jax.index import embed_corpus as ec
from realm_jax.index.scann_searcher import ScannSettings
from realm_jax.index.store import IndexStore
from realm_jax.refresh import Refresher, RefreshSettings
from realm_jax.checkpoints import TrainCheckpoints
from tiny_corpus import TOWER, damage_checkpoint, random_tower, write_corpus

REPO = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module")
def base_params():
    return random_tower(0)


def tower(base, seed: int):
    """A distinct tower per seed, cheaply: the base params plus seeded noise."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + rng.normal(0, 0.05, x.shape)).astype(x.dtype), base)


def step_params(base, step: int):
    return {"query_tower": tower(base, 1000 + step), "doc_tower": tower(base, step),
            "reader": {"w": np.full(3, step, np.float32)}}


def make_workdir(path, base, steps) -> TrainCheckpoints:
    checkpoints = TrainCheckpoints(path)
    checkpoints.layout.write_model({"query_tower": TOWER, "doc_tower": TOWER, "reader": TOWER})
    for step in steps:
        checkpoints.save(step, step_params(base, step))
    checkpoints.wait_until_finished()
    return checkpoints


@pytest.fixture(scope="module")
def store(tmp_path_factory, minilm_path):
    folder = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(folder / "docs.jsonl", 12, max_passages=4)
    result = prepare_corpus(docs, folder / "store",
                            tokenizer=minilm_path, mode="dpr", passage_words=12, progress=False)
    with BlockStore.open(result.path) as s:
        yield s


@pytest.fixture(scope="module")
def embedder():
    return ec.CorpusEmbedder(TOWER, batch_size=16, dtype="float16")


@pytest.fixture(scope="module")
def settings(store, minilm_path):
    return RefreshSettings(corpus=os.fspath(store.path), tokenizer=minilm_path, batch_size=16,
                           dtype="float16", poll_seconds=0.0, keep_snapshots=2,
                           scann=ScannSettings(num_threads=1))


@pytest.fixture(scope="module")
def expected(store, embedder, minilm_path):
    """Embeddings of the corpus with a given doc tower, computed in memory."""
    rows = ec.RowBuilder.for_store(store, minilm_path, max_length=128)
    cache = {}

    def embed(params):
        key = ec.params_fingerprint(TOWER, params)
        if key not in cache:
            cache[key] = embedder.embed_blocks(embedder.place(params), rows, np.arange(len(store)))
        return cache[key]

    return embed


def refresher(workdir, settings, embedder, **kwargs) -> Refresher:
    kwargs.setdefault("progress", False)
    return Refresher(workdir, settings, embedder_factory=lambda config: embedder, **kwargs)


def log_lines(workdir) -> list[dict]:
    path = Path(workdir) / "refresh_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------
# The checkpoint contract


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    opt_state: dict


def test_train_checkpoints_contract(tmp_path, base_params, embedder):
    writer = TrainCheckpoints(tmp_path, max_to_keep=2, async_save=True)
    writer.layout.write_model({"query_tower": TOWER, "doc_tower": TOWER})
    for step in (1, 2, 3):
        writer.save(step, step_params(base_params, step),
                    train_state={"step": np.int32(step), "opt_state": {"mu": np.ones(2)}},
                    meta={"data": {"position": step}})
    writer.wait_until_finished()
    reader = TrainCheckpoints(tmp_path)
    assert reader.all_steps() == [2, 3] and reader.latest_step() == 3
    assert reader.model_configs() == {"query_tower": TOWER, "doc_tower": TOWER}
    assert reader.parts(3) == ["doc_tower", "query_tower", "reader"]
    want = step_params(base_params, 3)
    jax.tree.map(np.testing.assert_array_equal, reader.restore_part(3, "doc_tower"),
                 want["doc_tower"])
    on_devices = reader.restore_part(3, "doc_tower", shardings=embedder.param_shardings)
    jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"),
                 on_devices, embedder.param_shardings)
    with pytest.raises(KeyError, match="no part 'nope'.*'doc_tower', 'query_tower', 'reader'"):
        reader.restore_part(3, "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint step 1 in"):
        reader.restore_part(1, "doc_tower")
    # Whole checkpoints: host arrays, or onto a train-state target's shardings.
    host, meta = reader.restore(2)
    assert meta == {"data": {"position": 2}} and int(host["train_state"]["step"]) == 2
    jax.tree.map(np.testing.assert_array_equal, host["params"], step_params(base_params, 2))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                         sharding=sharding),
                          _State(np.int32(0), want, {"mu": np.ones(2)}))
    state, _ = reader.restore(3, target)
    assert int(state.step) == 3 and isinstance(state, _State)
    np.testing.assert_array_equal(state.params["reader"]["w"], want["reader"]["w"])
    # The finished marker, in either place.
    assert not reader.is_finished()
    writer.mark_finished()
    assert reader.is_finished()
    other = TrainCheckpoints(tmp_path / "other")
    assert other.latest_step() is None and not other.is_finished()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "FINISHED").write_text("")
    assert other.is_finished()
    writer.close()



def test_pinned_checkpoint_outlives_max_to_keep(tmp_path, base_params):
    """The trainer pins the checkpoint its index snapshot came from: kept while pinned,
    pruned at the first save after another step is pinned."""
    with TrainCheckpoints(tmp_path, max_to_keep=2) as writer:
        def save(*steps):
            for step in steps:
                writer.save(step, step_params(base_params, step))
            return TrainCheckpoints(tmp_path).all_steps()

        writer.pin(1)
        assert save(1, 2, 3, 4) == [1, 3, 4]
        writer.pin(3)
        assert save(5) == [3, 4, 5]
        assert save(6) == [3, 5, 6]
        writer.pin(None)
        assert save(7) == [6, 7]

def test_train_checkpoints_in_a_relative_workdir(tmp_path, monkeypatch, base_params):
    """`realm-jax demo` trains in ./workdir/...: orbax wants absolute paths."""
    monkeypatch.chdir(tmp_path)
    writer = TrainCheckpoints("run", async_save=True)
    writer.save(1, jax.tree.map(jnp.asarray, step_params(base_params, 1)),
                train_state={"step": jnp.int32(1)})
    writer.wait_until_finished()
    assert TrainCheckpoints(tmp_path / "run").all_steps() == [1]
    writer.close()


def test_restore_part_reads_only_that_part(tmp_path, base_params):
    """Saved without OCDBT (one folder per array), the other parts' arrays can be deleted:
    restoring the document tower does not touch them."""
    params = step_params(base_params, 5)
    with ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers={
            "params": ocp.PyTreeCheckpointHandler(use_ocdbt=False)}) as manager:
        manager.save(5, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params)))
    folder = tmp_path / "checkpoints" / "5" / "params"
    removed = [p for p in folder.iterdir() if p.name.startswith(("query_tower.", "reader."))]
    assert removed
    for p in removed:
        shutil.rmtree(p)
    reader = TrainCheckpoints(tmp_path)
    reader.layout.write_model({"query_tower": TOWER, "doc_tower": TOWER})
    jax.tree.map(np.testing.assert_array_equal, reader.restore_part(5, "doc_tower"),
                 params["doc_tower"])
    assert not any(p.exists() for p in removed)


# ---------------------------------------------------------------------------------------
# The refresher in-process


def test_refresh_once_uses_only_the_newest_doc_tower(tmp_path, base_params, settings, embedder,
                                                     expected, store):
    make_workdir(tmp_path, base_params, [10, 20])
    calls = []
    r = refresher(tmp_path, settings, embedder)
    restore_part = r.checkpoints.restore_part
    r.checkpoints.restore_part = lambda step, part, **kw: (calls.append((step, part)),
                                                           restore_part(step, part, **kw))[1]
    results = r.run(once=True)
    assert calls == [(20, "doc_tower")]
    assert [(x.step, x.skipped_steps, x.embedded) for x in results] == [(20, [10], len(store))]
    snapshot = IndexStore(tmp_path / "index").latest(expected_corpus_fingerprint=store.fingerprint)
    assert snapshot.step == 20 and snapshot.dtype == "float16"
    assert snapshot.manifest["extra"]["source"] == "checkpoint"
    assert snapshot.model_fingerprint == ec.params_fingerprint(
        TOWER, step_params(base_params, 20)["doc_tower"])
    np.testing.assert_array_equal(snapshot.embeddings(),
                                  expected(step_params(base_params, 20)["doc_tower"]))
    assert not np.allclose(snapshot.embeddings().astype(np.float32),
                           expected(step_params(base_params, 10)["doc_tower"]), atol=1e-2)
    assert snapshot.scann_settings["mode"] == "brute_force"
    [line] = log_lines(tmp_path)
    assert line["step"] == 20 and line["docs_per_second"] > 0 and line["seconds"] > 0
    # Nothing new: no refresh, no log line; the scratch space is empty.
    assert r.run(once=True) == [] and len(log_lines(tmp_path)) == 1
    assert list((tmp_path / "refresh").iterdir()) == []


def test_loop_skips_superseded_checkpoints_until_finished(tmp_path, base_params, settings,
                                                          embedder, expected):
    checkpoints = make_workdir(tmp_path, base_params, [1])
    sleeps = []

    def trainer_meanwhile(seconds):  # the trainer writes two checkpoints, then finishes
        sleeps.append(seconds)
        if len(sleeps) == 1:
            for step in (2, 3):
                checkpoints.save(step, step_params(base_params, step))
            checkpoints.mark_finished()

    r = refresher(tmp_path, settings, embedder, sleep=trainer_meanwhile)
    results = r.run()
    assert [(x.step, x.skipped_steps) for x in results] == [(1, []), (3, [2])]
    assert len(sleeps) == 1
    index = IndexStore(tmp_path / "index")
    assert index.versions() == ["v000001", "v000002"]
    np.testing.assert_array_equal(index.latest().embeddings(),
                                  expected(step_params(base_params, 3)["doc_tower"]))
    assert r.run() == []  # finished and current: returns at once


def test_from_hf_first_then_checkpoints(tmp_path, base_params, settings, embedder, expected,
                                        minilm_path):
    # A sentence-transformers style BERT folder (mean pooling), as all-MiniLM-L6-v2.
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    folder = hf.save(tmp_path / "pretrained", TOWER.encoder, tower(base_params, 7)["encoder"],
                     architecture="BertModel", extra_files={
                         "modules.json": json.dumps(modules),
                         "1_Pooling/config.json": json.dumps({"pooling_mode_mean_tokens": True})})
    assert hf.load_embedder(folder)[0] == TOWER
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* and no --from_hf"):
        refresher(tmp_path / "w", settings, embedder).run(once=True)
    r = refresher(tmp_path / "w", settings, embedder, from_hf=folder)
    [first] = r.run(once=True)
    assert (first.step, first.source) == (0, "hf")
    index = IndexStore(tmp_path / "w" / "index")
    np.testing.assert_allclose(index.latest().embeddings().astype(np.float32),
                               expected(tower(base_params, 7)), atol=2e-3)
    assert r.run(once=True) == []  # the HF index is current while no checkpoint exists
    make_workdir(tmp_path / "w", base_params, [4])
    [second] = r.run(once=True)
    assert (second.step, second.source) == (4, "checkpoint")
    assert index.latest().manifest["extra"]["source"] == "checkpoint"


def test_crash_mid_embedding_resumes_from_complete_shards(tmp_path, base_params, settings,
                                                          embedder, expected, store):
    make_workdir(tmp_path, base_params, [6])
    small = dataclasses.replace(settings, shard_size=16)
    shards = []

    def crash_after_first_shard(stage):
        if stage == "shard":
            shards.append(stage)
            raise KeyboardInterrupt("killed")

    assert len(store) > 16
    with pytest.raises(KeyboardInterrupt):
        refresher(tmp_path, small, embedder, on_stage=crash_after_first_shard).run(once=True)
    assert IndexStore(tmp_path / "index").latest_version() is None
    [result] = refresher(tmp_path, small, embedder).run(once=True)
    assert result.reused == 16 and result.embedded == len(store) - 16
    np.testing.assert_array_equal(IndexStore(tmp_path / "index").latest().embeddings(),
                                  expected(step_params(base_params, 6)["doc_tower"]))
    # A newer checkpoint: the old step's shards are dropped, not mixed in.
    make_workdir(tmp_path, base_params, [7])
    shards.clear()
    with pytest.raises(KeyboardInterrupt):
        refresher(tmp_path, small, embedder, on_stage=crash_after_first_shard).run(once=True)
    make_workdir(tmp_path, base_params, [8])
    [result] = refresher(tmp_path, small, embedder).run(once=True)
    assert (result.step, result.reused) == (8, 0)
    assert [p.name for p in (tmp_path / "refresh").iterdir()] == []


def test_two_workers(tmp_path, base_params, settings, embedder, expected):
    make_workdir(tmp_path, base_params, [9])
    errors = []

    def worker():
        try:
            refresher(tmp_path, settings, embedder, worker=1, num_workers=2,
                      sleep=lambda s: time.sleep(0.02)).run()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    chief = refresher(tmp_path, settings, embedder, num_workers=2,
                      sleep=lambda s: time.sleep(0.02))
    [result] = chief.run(once=True)
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors
    assert result.embedded < result.count
    np.testing.assert_allclose(
        IndexStore(tmp_path / "index").latest().embeddings().astype(np.float32),
        expected(step_params(base_params, 9)["doc_tower"]), atol=2e-3)
    assert json.loads((tmp_path / "refresh" / "job.json").read_text())["stop"] is True


def test_two_worker_processes_publish_what_one_worker_does(tmp_path, base_params, settings,
                                                           embedder, store, minilm_path):
    """`realm-jax refresh --once` as two jax.distributed processes (the worker index is the
    process index): the chief publishes only once both slices are in, the same snapshot
    as one worker. A second round (a new checkpoint) starts over the first round's stop
    announcement, which the worker must not take for its own."""
    one, two = tmp_path / "one", tmp_path / "two"
    for workdir in (one, two):
        make_workdir(workdir, base_params, [5])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    argv = [sys.executable, "-m", "realm_jax.cli", "refresh", "--config",
            "configs/realm.py:tiny", "--workdir", str(two), "--corpus", os.fspath(store.path),
            f"--config.data.tokenizer={minilm_path}", "--config.refresh.poll_seconds=0.1",
            "--once", "--no_progress"]

    def two_workers(round_: int):
        port = socket_port()
        procs = [subprocess.Popen(argv + [f"--coordinator_address=localhost:{port}",
                                          "--num_processes=2", f"--process_id={i}"],
                                  stdout=open(tmp_path / f"round{round_}-p{i}.log", "w"),
                                  stderr=subprocess.STDOUT, env=env, cwd=REPO)
                 for i in range(2)]
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        logs = [(tmp_path / f"round{round_}-p{i}.log").read_text() for i in range(2)]
        assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
        assert "worker 1/2: embedded" in logs[1]
        return IndexStore(two / "index").latest()

    [single] = refresher(one, settings, embedder).run(once=True)
    reference = IndexStore(one / "index").latest()
    for round_ in (1, 2):
        snapshot = two_workers(round_)
        assert snapshot.step == reference.step == single.step
        np.testing.assert_allclose(snapshot.embeddings().astype(np.float32),
                                   reference.embeddings().astype(np.float32), atol=2e-3)
        for field in ("step", "model_fingerprint", "corpus_fingerprint", "count", "dim",
                      "dtype", "searcher"):
            assert snapshot.manifest[field] == reference.manifest[field], field
        assert snapshot.manifest["extra"]["source"] == "checkpoint"
        if round_ == 1:  # a newer checkpoint for both
            for workdir in (one, two):
                make_workdir(workdir, base_params, [6])
            [single] = refresher(one, settings, embedder).run(once=True)
            reference = IndexStore(one / "index").latest()
    assert [r["step"] for r in log_lines(two)] == [5, 6]


def socket_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_cli_refresh(tmp_path, base_params, store, minilm_path, capsys):
    make_workdir(tmp_path, base_params, [3])
    argv = ["refresh", "--config", "configs/realm.py:tiny", "--workdir", str(tmp_path),
            "--corpus", os.fspath(store.path), f"--config.data.tokenizer={minilm_path}",
            "--config.refresh.scann.brute_force_below=0", "--once", "--no_progress"]
    assert cli.main(argv) == 0
    snapshot = IndexStore(tmp_path / "index").latest()
    assert snapshot.step == 3 and snapshot.scann_settings["mode"] == "tree_ah_reorder"
    assert cli.main(argv[:-2] + ["--config.refresh.nope=1", "--once"]) != 0
    assert cli.main(["refresh", "--workdir", str(tmp_path), "--config",
                     "configs/realm.py:tiny", "--once", "--no_progress"]) == 2
    assert "no corpus: set config.data.corpus or pass --corpus" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# SIGKILL at random moments

# Imports everything once, then forks one refresher per request (before JAX starts any
# thread), so each trial costs a fork, not an interpreter start; the driver kills the
# child with SIGKILL after the requested delay and reports how it ended.
DRIVER = textwrap.dedent("""
    import json, logging, os, signal, sys, time, traceback
    import realm_jax.cli, realm_jax.refresh, realm_jax.index.embed_corpus
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        started = time.time()
        pid = os.fork()
        if pid == 0:
            os.dup2(log, 1)
            os.dup2(log, 2)
            logging.getLogger("realm_jax.refresh.stages").setLevel(logging.DEBUG)
            try:
                code = realm_jax.cli.main(job["argv"])
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        os.close(log)
        status = None
        if job["kill_after"] is not None:
            # The delay counts from the fork, or from the line announcing job["stage"].
            marker = ("refresh stage: " + job["stage"] + "\\n").encode() if job["stage"] else None
            deadline = None if marker else started + job["kill_after"]
            while deadline is None or time.time() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if deadline is None:
                    with open(job["log"], "rb") as f:
                        if marker in f.read():
                            deadline = time.time() + job["kill_after"]
                time.sleep(0.0005)
            else:
                os.kill(pid, signal.SIGKILL)
                status = None
        if status is None:
            status = os.waitpid(pid, 0)[1]
        print(json.dumps({"started": started, "seconds": time.time() - started,
                          "killed": os.WIFSIGNALED(status),
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}),
              flush=True)
""")
_STAGE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG "
                       r"realm_jax\.refresh\.stages: refresh stage: (\S+)", re.M)


def _stages(log: Path) -> list[tuple[float, str]]:
    """(unix time, stage) of each stage line a child logged."""
    out = []
    for stamp, stage in _STAGE_RE.findall(log.read_text(errors="replace")):
        t = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000
        out.append((t, stage))
    return out


def _check_index(index: IndexStore, expected_by_step: dict[int, np.ndarray]) -> None:
    """LATEST names a complete valid snapshot; every published one holds exactly the
    embeddings of its step's document tower."""
    latest = index.latest_version()
    if latest is None:
        return
    assert latest in index.versions()
    for version in index.versions():
        snapshot = index.load(version)  # validates sizes and sha256 against the manifest
        np.testing.assert_allclose(snapshot.embeddings().astype(np.float32),
                                   expected_by_step[snapshot.step].astype(np.float32),
                                   atol=2e-3, err_msg=f"{version} (step {snapshot.step})")


def test_sigkill_at_random_moments(tmp_path, base_params, store, expected, minilm_path):
    workdir = tmp_path / "work"
    checkpoints = make_workdir(workdir, base_params, [])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    argv = ["refresh", "--config", "configs/realm.py:tiny", "--workdir", str(workdir),
            "--corpus", os.fspath(store.path), f"--config.data.tokenizer={minilm_path}",
            "--config.refresh.shard_size=16", "--config.refresh.scann.brute_force_below=0",
            "--config.refresh.poll_seconds=0.05", "--no_progress"]

    def run(kill_after, log, stage=None, once=True):
        driver.stdin.write(json.dumps({"argv": argv + (["--once"] if once else []),
                                       "log": str(log), "kill_after": kill_after,
                                       "stage": stage}) + "\n")
        driver.stdin.flush()
        return json.loads(driver.stdout.readline())

    try:
        assert driver.stdout.readline().strip() == "ready"
        index = IndexStore(workdir / "index")
        expected_by_step, step = {}, 0

        def new_checkpoint():
            nonlocal step
            step += 1
            params = step_params(base_params, step)
            checkpoints.save(step, params)
            checkpoints.wait_until_finished()
            expected_by_step[step] = expected(params["doc_tower"])

        # Full runs first (the first one fills the compilation cache). The second one's
        # stages and their durations: each kill picks a stage at random and a random delay
        # within that stage (counted from its log line), so the kills cover startup,
        # restoring, embedding, merging, building and every step of publishing.
        for _ in range(2):
            new_checkpoint()
            calibration = run(None, tmp_path / "calibration.log")
            assert calibration["code"] == 0, (tmp_path / "calibration.log").read_text()[-3000:]
        timeline = [(t - calibration["started"], s) for t, s in _stages(tmp_path / "calibration.log")]
        ends = [t for t, _ in timeline[1:]] + [calibration["seconds"]]
        windows = [(None, timeline[0][0])] + [
            (s, max(end - t, 0.002)) for (t, s), end in zip(timeline, ends) if s != "logged"]
        print("calibration:", [(round(t, 3), s) for t, s in timeline], calibration["seconds"])
        _check_index(index, expected_by_step)

        rng = random.Random(0)
        hit, trials, finished_last = [], 0, True
        while trials < 22:
            if finished_last or rng.random() < 0.5:
                new_checkpoint()  # else: the same step again, resuming the killed run
            stage, length = windows[rng.randrange(len(windows))]
            delay = rng.uniform(0, length)
            log = tmp_path / f"trial{trials}.log"
            outcome = run(delay, log, stage)
            finished_last = not outcome["killed"]
            if finished_last:
                assert outcome["code"] == 0, log.read_text()[-3000:]
            stages = _stages(log)
            hit.append(stages[-1][1] if stages else "startup")
            print(f"trial {trials}: step {step}, kill {delay * 1000:.1f} ms after "
                  f"{stage or 'the fork'}: killed {outcome['killed']}, last stage {hit[-1]}")
            _check_index(index, expected_by_step)
            trials += 1
        assert len(set(hit)) >= 5, hit
        assert any(h.startswith("publish") for h in hit), hit

        # The trainer writes a last checkpoint and finishes; a restarted refresher (its loop,
        # not --once) brings the index to the last step and exits.
        new_checkpoint()
        checkpoints.mark_finished()
        final = run(None, tmp_path / "final.log", once=False)
        assert final["code"] == 0, (tmp_path / "final.log").read_text()[-3000:]
        _check_index(index, expected_by_step)
        assert index.latest().step == step and len(index.versions()) == 2
        leftovers = [p.name for p in (workdir / "index").iterdir() if p.name.startswith(".")]
        leftovers += [p.name for p in (workdir / "refresh").iterdir()]
        assert leftovers == []
        assert log_lines(workdir)[-1]["step"] == step
        print(f"stages hit by the kills: {sorted(set(hit))}")
    finally:
        driver.stdin.close()
        driver.wait(timeout=30)


# ---------------------------------------------------------------------------------------
# Bad data and a second refresher (issue 25)


def test_damaged_snapshot_is_not_reused(tmp_path, base_params, settings, embedder, expected,
                                        caplog):
    """The same document tower at a new step reuses the published embeddings only once they
    are verified: damaged ones are embedded anew, never republished under fresh checksums."""
    checkpoints = make_workdir(tmp_path, base_params, [1])
    [first] = refresher(tmp_path, settings, embedder).run(once=True)
    index = IndexStore(tmp_path / "index")
    emb_file = index.root / first.version / "embeddings.npy"
    data = bytearray(emb_file.read_bytes())
    data[-2:] = b"\x00\x7e"  # the last value becomes NaN: same size, wrong sha256
    emb_file.write_bytes(bytes(data))
    checkpoints.save(2, dict(step_params(base_params, 2), doc_tower=tower(base_params, 1)))
    checkpoints.wait_until_finished()
    with caplog.at_level("WARNING"):
        [second] = refresher(tmp_path, settings, embedder).run(once=True)
    assert "embeddings.npy: sha256 does not match" in caplog.text
    assert second.step == 2 and second.embedded == len(expected(tower(base_params, 1)))
    np.testing.assert_array_equal(index.latest().embeddings(), expected(tower(base_params, 1)))
    # A damaged reused snapshot found while reading it (after it was verified): embedded anew.
    r = refresher(tmp_path, settings, embedder)
    previous = r.published()
    data = bytearray((previous.path / "embeddings.npy").read_bytes())
    data[-1] ^= 0x01
    (previous.path / "embeddings.npy").write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level("WARNING"):
        third = r.refresh(r.newest_source(), previous)
    assert "not reusing damaged embeddings" in caplog.text and third.embedded > 0
    np.testing.assert_array_equal(index.latest().embeddings(), expected(tower(base_params, 1)))


def test_non_finite_embeddings_fail_the_refresh(tmp_path, base_params, settings, embedder):
    checkpoints = make_workdir(tmp_path, base_params, [])
    broken = jax.tree.map(lambda x: np.full_like(x, np.nan), tower(base_params, 5))
    checkpoints.save(5, dict(step_params(base_params, 5), doc_tower=broken))
    checkpoints.wait_until_finished()
    with pytest.raises(ValueError, match=r"refusing to publish step 5 .* NaN or infinity"):
        refresher(tmp_path, settings, embedder).run(once=True)
    assert IndexStore(tmp_path / "index").versions() == []


def test_second_refresher_refuses_to_start(tmp_path, base_params, settings, embedder):
    from realm_jax.durable import LockHeld, ProcessLock

    make_workdir(tmp_path, base_params, [])
    lock = ProcessLock.acquire(tmp_path / "refresh" / "lock", "refresher")
    with pytest.raises(LockHeld, match=f"another refresher holds .*pid {os.getpid()}"):
        refresher(tmp_path, settings, embedder).run(once=True)
    lock.release()  # (workers take no lock: test_two_workers runs one beside its chief)
    # A lock left by a dead refresher on this host is taken over (and released at the end).
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / "refresh" / "lock").write_text(json.dumps(
        {"pid": child.pid, "host": __import__("socket").gethostname()}))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        refresher(tmp_path, settings, embedder).run(once=True)
    assert not (tmp_path / "refresh" / "lock").exists()


def test_refresh_falls_back_from_an_unreadable_checkpoint(tmp_path, base_params, settings,
                                                          embedder, expected, store, caplog):
    """The newest checkpoint's files are damaged: the refresher warns and embeds the corpus
    with the previous checkpoint's document tower, instead of stopping."""
    make_workdir(tmp_path, base_params, [10, 20])
    damage_checkpoint(tmp_path / "checkpoints" / "20")
    with caplog.at_level(logging.WARNING, logger="realm_jax.refresh"):
        results = refresher(tmp_path, settings, embedder).run(once=True)
    assert [r.step for r in results] == [10]
    assert "checkpoints/20: cannot restore" in caplog.text
    snapshot = IndexStore(tmp_path / "index").latest()
    np.testing.assert_array_equal(snapshot.embeddings(),
                                  expected(step_params(base_params, 10)["doc_tower"]))
