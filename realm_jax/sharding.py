"""Device mesh, logical-axis rules and sharded parameter placement.

Parameters and activations are annotated with logical axis names (batch, length, embed,
heads, kv, mlp, vocab, corpus, layers); one rules table maps them onto the mesh axes
(data, fsdp, tensor). A rule whose mesh axis is already taken by an earlier dimension of
the same array is skipped, so activations shard batch over (data, fsdp) while parameters
shard embed over fsdp.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("corpus", ("data", "fsdp", "tensor")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv", None),
    ("layers", None),
)


def use_cpu_devices(count: int | None = None) -> int:
    """Split the host's cores into `count` JAX CPU devices (default: one per usable core);
    call before JAX creates its backends, else the backend keeps its devices. Returns the
    count the CPU backend has or will have (XLA_FLAGS' device count, when given, wins).
    Devices of a GPU or TPU host are unaffected.

    Why: XLA:CPU runs a transformer's small operations (attention's per-head matmuls,
    normalization, softmax) on few threads; separate devices, each a shard of the batch, run
    them side by side (what that gains for corpus embedding: docs/experiments.md)."""
    flag = "--xla_force_host_platform_device_count="
    given = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(flag)]
    if given:
        return int(given[-1][len(flag):])
    if not count:
        count = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends already exist (e.g. an earlier jax.devices())
        return len(jax.devices("cpu"))
    return count


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace a single -1 by whatever divides the remaining devices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must give one size per axis {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                         f"{num_devices} are available")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    """A (data, fsdp, tensor) mesh. Axes are Auto: the compiler propagates shardings from
    the logical constraints, rather than every op carrying an explicit sharding type."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config) -> Mesh:
    """`config.mesh.shape` (data, fsdp, tensor)."""
    return make_mesh(tuple(config.mesh.shape))


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    rules = config.sharding_rules
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in (rules or DEFAULT_RULES))


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
    """The mesh and rules under which logical constraints resolve (wrap tracing/calls)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop the mesh axes of any dimension they do not divide (e.g. BERT's 30522-word
    vocabulary over 4 tensor shards): that dimension is replicated instead."""
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fixed.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fixed)


def param_shardings(init_fn: Callable[..., Any], *args, mesh: Mesh, rules=DEFAULT_RULES
                    ) -> Any:
    """NamedShardings of the (unboxed) params `init_fn(*args)` would produce: the logical
    specs of its nn.Partitioned boxes mapped onto `mesh` by `rules`."""
    with activate(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract))
    return jax.tree.map(
        lambda sh, shape: NamedSharding(mesh, _divisible_spec(sh.spec, shape, mesh)),
        shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding))


def init_sharded(init_fn: Callable[..., Any], *args, mesh: Mesh, rules=DEFAULT_RULES):
    """Run `init_fn(*args)` (returning boxed variables) under jit with out_shardings, so every
    parameter is born on its shards. Returns (unboxed variables, their shardings)."""
    shardings = param_shardings(init_fn, *args, mesh=mesh, rules=rules)
    with activate(mesh, rules):
        variables = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return variables, shardings


def place(tree, shardings) -> Any:
    """Put host arrays (e.g. loaded weights) onto their shards."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def model_shardings(cfg, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings of the params of model config `cfg`'s module."""
    return param_shardings(lambda: cfg.module().init(jax.random.key(0), **cfg.example_inputs()),
                           mesh=mesh, rules=rules)["params"]


def part_shardings(configs: dict, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """{part: NamedShardings of its params} for {part: model config}."""
    return {part: model_shardings(cfg, mesh, rules) for part, cfg in configs.items()}


def placed_shapes(shapes, shardings):
    """ShapeDtypeStructs of `shapes` on `shardings` (matching trees): a sharded restore's target."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch's rows split over the data-parallel axes (data and fsdp)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_multiple(n: int, mesh: Mesh) -> int:
    """`n` rounded up to a multiple of the mesh's batch shards (data x fsdp)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-n // shards) * shards


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Global arrays of `sharding` from this process's rows of each field."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def local_rows(x: np.ndarray) -> np.ndarray:
    """This process's rows of a global batch held whole on every process (processes hold
    consecutive equal slices)."""
    n = len(x) // jax.process_count()
    return x[jax.process_index() * n:(jax.process_index() + 1) * n]
