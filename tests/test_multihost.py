"""Multi-process runs with jax.distributed on one CPU machine: `realm-jax train` as two
processes (localhost coordinator, 2 emulated devices each) over one global 2 x 2 mesh, with
the data axis across the processes and the tensor axis inside each; stopped after a
checkpoint and resumed; the same losses and parameters as one process with 4 devices.
Also the helpers of realm_jax.distributed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from realm_jax import config as config_lib
from realm_jax import distributed
from realm_jax.data.corpus import prepare_corpus
from realm_jax.data.store import BlockStore
from realm_jax.index.embed_corpus import CorpusEmbedder, RowBuilder, params_fingerprint
from realm_jax.index.store import IndexStore
from realm_jax.tasks import realm
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, wiki_sample_path, minilm_path):
    """A 2-document block store, the config overrides, and an index (step 0: the initial
    document tower) that every run starts from (no refresher: one index all along)."""
    root = tmp_path_factory.mktemp("multihost")
    corpus = root / "store"
    prepare_corpus(wiki_sample_path, corpus, tokenizer=minilm_path, mode="realm", max_tokens=32,
                   max_documents=2, progress=False)
    overrides = [f"data.corpus={corpus}", f"data.tokenizer={minilm_path}",
                 "model.encoder.vocab_size=30522", "model.encoder.num_layers=1",
                 "mesh.shape=(2,1,2)", f"train.steps={STEPS}", "train.checkpoint_every=2",
                 "data.heldout_fraction=0", "train.eval_queries=0", "train.log_every=1"]
    config = config_lib.load_config("realm:tiny", *overrides)
    configs, params = realm.build_models(config)
    store = BlockStore.open(corpus)
    tower = configs["doc_tower"]
    embedder = CorpusEmbedder(tower, batch_size=16, dtype=config.refresh.dtype)
    rows = RowBuilder.for_store(store, minilm_path, max_length=embedder.max_length)
    IndexStore(root / "index").publish(
        embedder.embed_blocks(embedder.place(params["doc_tower"]), rows, np.arange(len(store))),
        step=0, model_fingerprint=params_fingerprint(tower, params["doc_tower"]),
        corpus_fingerprint=store.fingerprint, dtype=config.refresh.dtype)
    return root, overrides


def start(workdir: Path, name: str, overrides, cache: Path, *, processes: int,
          devices: int, extra=()) -> list:
    """`realm-jax train` as `processes` processes (a jax.distributed run when more than
    one) with `devices` CPU devices each. Compiled without XLA's costly optimizations (the
    step compiles in half the time; every run here compiles the same way)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    for variable, _ in distributed.FLAGS.values():
        env.pop(variable, None)
    argv = [sys.executable, "-m", "realm_jax.cli", "train", "--workdir", str(workdir),
            "--config", f"{REPO / 'configs' / 'realm.py'}:tiny",
            *[f"--config.{o}" for o in overrides], *extra]
    port = free_port()
    runs = []
    for i in range(processes):
        flags = ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                  f"--process_id={i}"] if processes > 1 else [])
        log = workdir.parent / f"{name}-p{i}.log"
        runs.append((subprocess.Popen(argv + flags, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
    return runs


def finish(runs, timeout: float = 600) -> list[str]:
    """Each process's output, once all have exited 0."""
    try:
        codes = [p.wait(timeout=timeout) for p, _ in runs]
    finally:
        for p, _ in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for _, log in runs]
    for code, out in zip(codes, outputs):
        assert code == 0, out[-4000:]
    return outputs


def test_two_processes_match_one(tmp_path, setup):
    root, overrides = setup
    cache = tmp_path / "jax_cache"
    one, two = tmp_path / "one", tmp_path / "two"
    for workdir in (one, two):
        workdir.mkdir()
        shutil.copytree(root / "index", workdir / "index")

    # One process with 4 devices, straight through; beside it two processes with 2 devices
    # each (the same 2 x 2 mesh), stopped after the checkpoint at step 2, then resumed.
    reference = start(one, "one", overrides, cache, processes=1, devices=4)
    first = finish(start(two, "first", overrides, cache, processes=2, devices=2,
                         extra=["--stop_after=2"]))
    ckpts = TrainCheckpoints(two)
    assert ckpts.all_steps() == [0, 2] and not ckpts.is_finished()
    for i, out in enumerate(first):
        assert f"process {i} of 2: 2 local devices of 4" in out, out[-3000:]
        assert "axes across processes: ('data',)" in out, out[-3000:]
    assert "step 2/3" in first[0] and "step 2/3" not in first[1]  # process 0 reports
    second = finish(start(two, "second", overrides, cache, processes=2, devices=2))
    assert all("resumed" in out and "at step 2" in out for out in second)
    assert ckpts.latest_step() == STEPS and ckpts.is_finished()
    finish(reference)

    rows = {w: [r for r in read_metrics(w) if "loss" in r] for w in (one, two)}
    assert [r["step"] for r in rows[two]] == [1, 2, 3] == [r["step"] for r in rows[one]]
    for a, b in zip(rows[one], rows[two]):
        for key in ("loss", "retrieval_utility", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=key)
    a, b = (TrainCheckpoints(w).restore_params(STEPS) for w in (one, two))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


def test_initialize_flags(monkeypatch):
    for env, _ in distributed.FLAGS.values():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
    assert distributed.initialize() is False  # one process: nothing to do
    with pytest.raises(ValueError, match=r"--num_processes \(REALM_JAX_NUM_PROCESSES\), "
                                         r"--process_id"):
        distributed.initialize(coordinator_address="localhost:1234")
    monkeypatch.setenv("REALM_JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="REALM_JAX_NUM_PROCESSES='two'"):
        distributed.initialize(coordinator_address="localhost:1234", process_id=0)
    monkeypatch.setenv("REALM_JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="need 0 <= process_id < num_processes"):
        distributed.initialize(coordinator_address="localhost:1234", process_id=2)
    assert distributed.agree(7) == 7


def test_axes_across_processes():
    from jax.sharding import Mesh

    class Dev:
        def __init__(self, p):
            self.process_index = p

    class FakeMesh:
        def __init__(self, owners, names=("data", "fsdp", "tensor")):
            self.devices = np.vectorize(Dev)(np.asarray(owners))
            self.axis_names = names

    assert distributed.axes_across_processes(FakeMesh([[[0, 0]], [[1, 1]]])) == ("data",)
    assert distributed.axes_across_processes(FakeMesh([[[0, 1]], [[0, 1]]])) == ("tensor",)
    mesh = Mesh(np.asarray(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
    assert distributed.axes_across_processes(mesh) == ()
