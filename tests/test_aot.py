"""Ahead-of-time compilation of the REALM train step (realm_jax.aot, `realm-jax aot`): for
this host's CPU devices (always) and for a TPU topology through libtpu (where installed);
the abstract batch is the pipeline's; a step that does not fit fails with a clear message."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from realm_jax import aot, cli
from realm_jax import config as config_lib
from realm_jax.data.corpus import prepare_corpus
from realm_jax.data.realm_examples import QueryMaker
from realm_jax.data.store import BlockStore
from realm_jax import sharding as sharding_lib
from realm_jax.tasks import realm

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.encoder.num_layers=1", "train.batch_size=8"]
# libtpu: importable here, or where `make test` puts it (off the venv's path).
LIBTPU_DIR = REPO / ".venv" / "libtpu"
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None or (LIBTPU_DIR / "libtpu").is_dir()


def test_local_devices_report():
    config = config_lib.load_config("realm:tiny", *TINY)
    report = aot.report(config, "local", mesh_shape=(4, 1, 2), corpus_rows=300)
    assert report.num_devices == 8 and report.device_kind == "cpu"
    assert report.mesh == {"data": 4, "fsdp": 1, "tensor": 2}
    assert report.corpus_rows == 300 and report.batch_size == 8
    assert report.flops_per_device > 0
    assert report.argument_bytes > report.alias_bytes > 0 and report.peak_bytes > 0
    assert report.fits is None  # a CPU device reports no memory limit
    small = dataclasses.replace(report, device_memory_bytes=report.peak_bytes - 1)
    assert small.fits is False and "100%" in small.lines()[1]
    assert dataclasses.replace(report, device_memory_bytes=10 * report.peak_bytes).fits


def test_batch_shapes_are_the_pipelines(tmp_path, wiki_sample_path, minilm_path):
    store_dir = tmp_path / "store"
    prepare_corpus(wiki_sample_path, store_dir, tokenizer=minilm_path, mode="realm",
                   max_tokens=32, max_documents=1, progress=False)
    store = BlockStore.open(store_dir)
    rc = config_lib.load_config("realm:tiny").retrieval
    maker = QueryMaker.for_store(store, minilm_path, query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    local = next(iter(realm.query_dataset(store, maker, 8, seed=0)))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    batch = sharding_lib.global_batch({k: local[k] for k in realm.QUERY_FIELDS},
                                  jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    want = realm.batch_shapes(8, rc)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (v.shape, v.dtype) for k, v in want.items()}


def test_cli_does_not_fit(monkeypatch, capsys):
    report = aot.Report("v5e:2x2", "TPU v5 lite", 4, {"data": 4, "fsdp": 1, "tensor": 1}, 8,
                        None, 12 * aot.GIB, aot.GIB, aot.GIB, 6 * aot.GIB, 0, 16 * aot.GIB, 1e12)
    monkeypatch.setattr(aot, "report", lambda *a, **k: report)
    with pytest.raises(SystemExit, match=r"does not fit: one step needs 18.00 GiB per device, "
                                         r"a TPU v5 lite has 16.00 GiB"):
        cli.main(["aot", "--config", "configs/realm.py:tiny", "--topology", "v5e:2x2"])
    assert "memory per device: 18.00 GiB of 16.00 GiB (112%)" in capsys.readouterr().out
    assert aot.parse_mesh("(4, 2, 1)") == (4, 2, 1)
    with pytest.raises(ValueError, match="--mesh 'four': expected DATA,FSDP,TENSOR"):
        aot.parse_mesh("four")


def test_without_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(ValueError, match=r"needs libtpu: pip install 'realm-jax\[aot\]'"):
        aot.topology_devices("v5e:2x2")


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install "
                    "'realm-jax[aot]'; make test puts it in .venv/libtpu)")
def test_tpu_topology():
    """The tiny config compiled for a TPU v5e 2x2 slice; with a device memory smaller than
    the step needs, the command reports, then exits 1."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(LIBTPU_DIR), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "realm_jax.cli", "aot", "--config", "configs/realm.py:tiny",
            "--topology", "v5e:2x2", "--mesh", "2,1,2", "--json", "--device_memory_gib=0.001",
            "--config.retrieval.mode=scann", *[f"--config.{o}" for o in TINY]]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert "does not fit" in run.stderr and "a TPU v5 lite has 0.00 GiB" in run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["num_devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert report["flops_per_device"] > 0 and report["peak_bytes"] > 0
    assert report["corpus_rows"] is None and report["fits"] is False
