"""The train state (step, params, optimizer state), its shardings, and a sharded init."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realm_jax.sharding import placed_shapes


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _initial(optimizer: optax.GradientTransformation):
    """params -> the state at step 0."""
    return lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                opt_state=optimizer.init(p))


def state_shardings(optimizer: optax.GradientTransformation, params_abstract, param_shardings,
                    mesh: Mesh) -> TrainState:
    """Optimizer moments are sharded like the params they track; scalars are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, opt_abstract, param_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)


def create_state(optimizer: optax.GradientTransformation, params, shardings: TrainState
                 ) -> TrainState:
    """A fresh state around `params` (already placed on their shards), built on the devices."""
    return jax.jit(_initial(optimizer), in_shardings=(shardings.params,),
                   out_shardings=shardings)(params)


def abstract_state(optimizer: optax.GradientTransformation, params_abstract, shardings: TrainState
                   ) -> TrainState:
    """ShapeDtypeStructs with shardings: the target of a sharded restore."""
    return placed_shapes(jax.eval_shape(_initial(optimizer), params_abstract), shardings)
