"""Ahead-of-time checks: compile the real REALM train step of a config for a device
topology this machine does not have, and report what one step needs of each device.

    realm-jax aot --config configs/realm.py --topology v5e:4x4 [--mesh 4,4,1]

A TPU topology ("v5e:2x2", "v5p:2x2x2", "v4:2x2x1", ...) is compiled by libtpu, which runs
on a CPU-only host (`pip install 'realm-jax[aot]'`, i.e. `pip install libtpu`); "local"
compiles for this host's own devices (on a GPU host: the per-device shapes of a cluster
whose mesh it has). The report gives the per-device memory of one step (arguments, outputs,
temporaries; donated buffers counted once) against the device's memory, and the FLOPs of
one step. A step that does not fit is reported as such: by the compiler (on TPU it refuses
to compile: `DoesNotFit`) or by the report (`Report.fits`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from typing import Any, Sequence

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from realm_jax import models, sharding

_log = logging.getLogger(__name__)

GIB = 1 << 30
# Memory per JAX device (a chip; a core on v2/v3) by device_kind.
DEVICE_MEMORY_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
                     "TPU v6 lite": 32, "TPU7x": 192}
# The environment libtpu needs to start without a TPU VM's metadata server, and beside
# another process using libtpu (a compile touches no chip).
LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# Topology chip name -> (accelerator type prefix, TensorCores counted per chip in its name).
ACCELERATOR_TYPES = {"v2": ("v2", 2), "v3": ("v3", 2), "v4": ("v4", 2), "v5p": ("v5p", 2),
                     "v5e": ("v5litepod", 1), "v6e": ("v6e", 1)}
# Only corpus-size dependent in `device` retrieval mode: the default corpus rows when the
# config names no block store (REALM's Wikipedia: 13M blocks of 288 wordpieces).
DEFAULT_CORPUS_ROWS = 13_353_718


class DoesNotFit(Exception):
    """The compiler itself found that one step does not fit in a device's memory."""


@dataclasses.dataclass(frozen=True)
class Report:
    topology: str
    device_kind: str
    num_devices: int
    mesh: dict
    batch_size: int
    corpus_rows: int | None
    argument_bytes: int      # per device: state, batch, corpus shards, rng
    output_bytes: int
    alias_bytes: int         # outputs written into donated arguments
    temp_bytes: int
    code_bytes: int
    device_memory_bytes: int | None
    flops_per_device: float  # one step

    @property
    def peak_bytes(self) -> int:
        """Per-device memory of one step: arguments and temporaries, the outputs not
        aliased to donated arguments, the program."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_bytes is None else (
            self.peak_bytes <= self.device_memory_bytes)

    def lines(self) -> list[str]:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"

        memory = (f"{gib(self.peak_bytes)} of {gib(self.device_memory_bytes)} "
                  f"({100 * self.peak_bytes / self.device_memory_bytes:.0f}%)"
                  if self.device_memory_bytes else f"{gib(self.peak_bytes)} (device memory "
                  "unknown: give --device_memory_gib to check the fit)")
        corpus = f", corpus {self.corpus_rows:,} rows on the devices" if self.corpus_rows else ""
        return [
            f"topology {self.topology}: {self.num_devices} x {self.device_kind}, mesh "
            + " x ".join(f"{k}={v}" for k, v in self.mesh.items())
            + f", global batch {self.batch_size}{corpus}",
            f"memory per device: {memory}",
            f"  arguments {gib(self.argument_bytes)} (params, optimizer state, batch"
            f"{', corpus' if self.corpus_rows else ''}), outputs {gib(self.output_bytes)} "
            f"({gib(self.alias_bytes)} in donated buffers), temporaries "
            f"{gib(self.temp_bytes)}, program {gib(self.code_bytes)}",
            f"FLOPs per step: {self.flops_per_device:.4g} per device, "
            f"{self.flops_per_device * self.num_devices:.4g} in all",
        ]

    def as_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), peak_bytes=self.peak_bytes, fits=self.fits)


def topology_devices(topology: str) -> list:
    """The devices of `topology`: "local" (this host's), else a TPU topology compiled for
    by libtpu (without the hardware)."""
    if topology == "local":
        return jax.devices()
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise ValueError(f"--topology {topology}: compiling for a TPU topology needs libtpu: "
                         "pip install 'realm-jax[aot]' (or: pip install libtpu); "
                         "--topology local compiles for this host's devices")
    for name, value in LIBTPU_ENV.items():
        os.environ.setdefault(name, value)
    chip, _, shape = topology.partition(":")
    if chip in ACCELERATOR_TYPES and shape:  # e.g. v5e:4x4 -> v5litepod-16
        prefix, per_chip = ACCELERATOR_TYPES[chip]
        chips = math.prod(int(x) for x in shape.split("x") if x.isdigit())
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix}-{chips * per_chip}")
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu's own words (an unknown chip or shape)
        raise ValueError(f"--topology {topology}: libtpu cannot describe it ({e}); "
                         "expected CHIP:SHAPE, e.g. v5e:2x2, v5p:2x2x2, v4:2x2x1") from None


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence,
                       mesh_shape: Sequence[int] | None = None,
                       corpus_rows: int | None = None):
    """(compiled step, mesh, corpus rows or None, FLOPs of its matrix products): the
    trainer's jitted REALM step of `config`, lowered for abstract arguments on a mesh of
    `devices` and compiled."""
    from realm_jax.data.realm_examples import SpecialIds
    from realm_jax.tasks import realm
    from realm_jax.train.optim import make_optimizer
    from realm_jax.train.metrics import jaxpr_matmul_flops
    from realm_jax.train.state import abstract_state, state_shardings
    from realm_jax.train.trainer import jit_train_step

    tc, rc = config.train, config.retrieval
    mesh = _mesh(tuple(mesh_shape or config.mesh.shape), devices)
    rules = sharding.rules_from_config(config)
    task = realm.RealmTask(config)
    configs = task.model_configs()
    optimizer = make_optimizer(tc, task.lr_multipliers())
    abstract_params = {part: models.abstract_params(cfg) for part, cfg in configs.items()}
    shardings = state_shardings(optimizer, abstract_params,
                                task.param_shardings(configs, mesh, rules), mesh)
    state = abstract_state(optimizer, abstract_params, shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in realm.batch_shapes(tc.batch_size, rc).items()}
    corpus_rows = ((corpus_rows or _store_rows(config) or DEFAULT_CORPUS_ROWS)
                   if rc.mode == "device" else None)
    corpus = None if corpus_rows is None else realm.device_corpus_shapes(
        corpus_rows, configs["doc_tower"].output_dim, config.refresh.dtype, rc.block_length,
        mesh, rc.search_block_size)
    # The special ids are constants of the step: BERT's unless the tokenizer is at hand.
    special = SpecialIds(cls=101, sep=102, mask=103, pad=0)
    loss_fn = task.loss_fn(configs, special, num_valid=corpus_rows or 0)
    step = jit_train_step(loss_fn.train_loss, optimizer, shardings, batch_sharding,
                          None if corpus is None else {k: v.sharding for k, v in corpus.items()})
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype,
                               sharding=NamedSharding(mesh, PartitionSpec()))
    with sharding.activate(mesh, rules):
        traced = step.trace(state, batch, corpus, rng)     # traced once: FLOPs, then lowered
        flops = jaxpr_matmul_flops(traced.jaxpr)
        lowered = traced.lower()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # e.g. TPU: "the total memory required for HLO temporaries (...G) exceeds
            # available HBM (...G)"
            raise DoesNotFit(f"{devices[0].device_kind}, mesh "
                             f"{dict(mesh.shape)}: {str(e).splitlines()[0]}") from None
    return compiled, mesh, corpus_rows, flops


def _mesh(shape: Sequence[int], devices: Sequence) -> Mesh:
    """A (data, fsdp, tensor) mesh of `devices`, laid out along the chips' interconnect for
    a TPU topology. Touches no runtime (on a TPU VM the chips may be in use)."""
    from jax.experimental import mesh_utils

    shape = sharding.resolve_mesh_shape(shape, len(devices))
    return Mesh(mesh_utils.create_device_mesh(shape, list(devices)), sharding.MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))


def _store_rows(config) -> int | None:
    corpus = config.data.corpus
    if not corpus or not os.path.isdir(corpus):
        return None
    from realm_jax.data.store import BlockStore
    return len(BlockStore.open(corpus))


def device_memory(devices: Sequence) -> int | None:
    """Bytes of memory of one of `devices`: what the runtime says, else the table."""
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # compile-only devices have no runtime
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    gib = DEVICE_MEMORY_GIB.get(devices[0].device_kind)
    return None if gib is None else gib * GIB


def report(config: ml_collections.ConfigDict, topology: str, *,
           mesh_shape: Sequence[int] | None = None, corpus_rows: int | None = None,
           device_memory_gib: float | None = None) -> Report:
    """Compile the train step of `config` for `topology` and measure it."""
    devices = topology_devices(topology)
    compiled, mesh, rows, flops = compile_train_step(config, devices, mesh_shape, corpus_rows)
    memory = compiled.memory_analysis()
    limit = (int(device_memory_gib * GIB) if device_memory_gib else device_memory(devices))
    return Report(
        topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices),
        mesh=dict(mesh.shape), batch_size=int(config.train.batch_size), corpus_rows=rows,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes), device_memory_bytes=limit,
        flops_per_device=flops / len(devices))


def parse_mesh(text: str | None) -> tuple[int, ...] | None:
    """"4,2,1" or "(4, 2, 1)" -> (4, 2, 1) (data, fsdp, tensor; one may be -1)."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.strip("()[] ").split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR, e.g. 4,2,1") from None
