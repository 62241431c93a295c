"""Multi-process runs on JAX's own runtime (`jax.distributed`).

`realm-jax train` and `realm-jax refresh` call `initialize` before any other JAX use:

1. explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I`, or the
   environment variables REALM_JAX_COORDINATOR, REALM_JAX_NUM_PROCESSES,
   REALM_JAX_PROCESS_ID (a flag wins over its variable);
2. else a cluster JAX recognizes by itself (Cloud TPU VMs of a pod slice, SLURM steps,
   Open MPI, GKE): `jax.distributed.initialize()` reads everything from the environment
   (on a cluster, flags given in 1 may also be partial: JAX fills in the rest);
3. else one process, and nothing to do.

After it, `jax.devices()` lists every process's devices (process by process), so the
trainer's mesh spans all hosts with the leading `data` axis across them; each process feeds
its slice of every global batch; orbax checkpoints are written by all processes; what must
be written once (metrics, markers, index pointers) is written by process 0.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import jax
import numpy as np

_log = logging.getLogger(__name__)

# flag name -> (environment variable, type)
FLAGS = {"coordinator_address": ("REALM_JAX_COORDINATOR", str),
         "num_processes": ("REALM_JAX_NUM_PROCESSES", int),
         "process_id": ("REALM_JAX_PROCESS_ID", int)}


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process (jax.distributed; detected on Cloud TPU VMs and under SLURM)")
    group.add_argument("--coordinator_address", default=None,
                       help="HOST:PORT of process 0's coordinator (env REALM_JAX_COORDINATOR)")
    group.add_argument("--num_processes", type=int, default=None,
                       help="processes in the run (env REALM_JAX_NUM_PROCESSES)")
    group.add_argument("--process_id", type=int, default=None,
                       help="this process, 0 .. num_processes-1 (env REALM_JAX_PROCESS_ID)")


def detected_cluster() -> str | None:
    """The cluster environment `jax.distributed.initialize()` would configure itself from,
    or None. (JAX's own registry of cluster types: the one its initialize consults.)"""
    try:
        from jax._src import clusters
        kinds = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError):  # a JAX without the registry: flags only
        return None
    for kind in kinds:
        if not kind.opt_in_only_method and kind.is_env_present():
            return kind.__name__
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the other processes of a multi-process run (see the module docstring); True
    when this is one (or when JAX was already initialized so)."""
    if jax.distributed.is_initialized():
        return True
    given = {}
    for name, value in zip(FLAGS, (coordinator_address, num_processes, process_id)):
        env, kind = FLAGS[name]
        if value is None and os.environ.get(env, "") != "":
            try:
                value = kind(os.environ[env])
            except ValueError:
                raise ValueError(f"{env}={os.environ[env]!r}: not a valid --{name}") from None
        if value is not None:
            given[name] = value
    cluster = detected_cluster()
    if not given and cluster is None:
        return False
    missing = [f"--{name} ({FLAGS[name][0]})" for name in FLAGS if name not in given]
    if missing and cluster is None:
        raise ValueError(f"a multi-process run needs {', '.join(missing)} as well "
                         f"(given: {', '.join('--' + n for n in given)})")
    n, i = given.get("num_processes"), given.get("process_id")
    if n is not None and (n < 1 or (i is not None and not 0 <= i < n)):
        raise ValueError(f"--process_id={i} --num_processes={n}: need 0 <= process_id < "
                         "num_processes")
    _log.info("jax.distributed: %s", f"{cluster} environment" if cluster and missing
              else ", ".join(f"{k}={v}" for k, v in given.items()))
    jax.distributed.initialize(**given)
    _log.info("process %d of %d: %d local devices of %d (%s)", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count(),
              jax.devices()[0].platform)
    return True


def from_args(args: argparse.Namespace) -> bool:
    """`initialize` from the flags `add_flags` defined."""
    return initialize(args.coordinator_address, args.num_processes, args.process_id)


def agree(value: int) -> int:
    """Process 0's `value`, on every process (a broadcast; every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


class SharedWatcher:
    """A `SnapshotWatcher` polled in lockstep by all processes: process 0 polls, the others
    take the snapshot it chose, so every process swaps indexes at the same step. Each
    `poll()` is a collective: every process must call it as often as the others."""

    def __init__(self, watcher):
        self.watcher = watcher

    def __getattr__(self, name: str) -> Any:
        return getattr(self.watcher, name)

    def poll(self):
        from realm_jax.index.store import version_name

        chief = jax.process_index() == 0
        snapshot = self.watcher.poll() if chief else None
        number = agree(snapshot.number if snapshot is not None else -1)
        if number < 0 or chief:
            return snapshot
        w = self.watcher
        snapshot = w.store.load(version_name(number),
                                expected_corpus_fingerprint=w.expected_corpus_fingerprint)
        w.current = snapshot
        return snapshot


def shared_watcher(watcher):
    """`watcher` as it should be polled here: itself in a single-process run, else a
    `SharedWatcher` around it."""
    return watcher if jax.process_count() == 1 else SharedWatcher(watcher)


def axes_across_processes(mesh) -> tuple[str, ...]:
    """The mesh axes along which devices of different processes lie (over DCN or the
    network between hosts): the data axes, when the mesh is laid out as it should be."""
    owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
    return tuple(name for axis, name in enumerate(mesh.axis_names)
                 if (np.diff(owner, axis=axis) != 0).any())
