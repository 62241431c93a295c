"""Meshes from configs, logical rules, and sharded forward passes on 8 emulated devices."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from realm_jax import sharding
from realm_jax.models.encoder import EncoderConfig
from realm_jax.models.heads import MaskedLMConfig
from realm_jax.models.towers import EmbedderConfig

ENC = EncoderConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                    intermediate_size=64, max_position_embeddings=32, dropout_rate=0.0,
                    attention_dropout_rate=0.0)


def test_mesh_shape_resolution():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.resolve_mesh_shape((2, 2, 1), 8)


def test_mesh_from_config():
    import ml_collections
    cfg = ml_collections.ConfigDict({"mesh": {"shape": (2, -1, 2)}})
    mesh = sharding.mesh_from_config(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_indivisible_dimension_is_replicated():
    mesh = sharding.make_mesh((1, 2, 4))
    spec = sharding._divisible_spec(P("tensor", "fsdp"), (30522, 384), mesh)
    assert spec == P(None, "fsdp")


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (2, 2, 2)])
@pytest.mark.parametrize("scan", [False, True])
def test_sharded_forward_equals_single_device(mesh_shape, scan):
    cfg = MaskedLMConfig(ENC.replace(scan_layers=scan))
    module = cfg.module()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 96, size=(8, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, 10:] = 0

    def init(key):
        return module.init(key, ids, mask)

    single = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    ref_vars, _ = sharding.init_sharded(init, jax.random.key(0), mesh=single)
    with sharding.activate(single):
        ref = jax.jit(module.apply)(ref_vars, ids, mask)

    mesh = sharding.make_mesh(mesh_shape)
    variables, shardings = sharding.init_sharded(init, jax.random.key(0), mesh=mesh)
    layer = variables["params"]["encoder"]["layers"]
    query = (layer["layers"] if scan else layer["layers_0"])["attention"]["query"]["kernel"]
    expected = P(None, "fsdp", "tensor", None) if scan else P("fsdp", "tensor", None)
    assert query.sharding.spec == expected
    # Each device holds only its shard of the kernel.
    shard_shape = query.addressable_shards[0].data.shape
    assert shard_shape[-3 if not scan else -3] == query.shape[-3] // mesh.shape["fsdp"]
    assert shard_shape[-2] == query.shape[-2] // mesh.shape["tensor"]
    word = variables["params"]["encoder"]["word_embeddings"]["embedding"]
    assert word.sharding.spec == P("tensor", "fsdp")

    with sharding.activate(mesh):
        out = jax.jit(module.apply, in_shardings=(shardings, None, None))(variables, ids, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_loaded_weights_are_placed_sharded(tmp_path):
    cfg = EmbedderConfig(ENC, pooling="mean", normalize=True)
    from flax import linen as nn
    params = jax.tree.map(np.asarray, nn.unbox(
        cfg.module().init(jax.random.key(1), **cfg.example_inputs()))["params"])
    mesh = sharding.make_mesh((4, 1, 2))
    shardings = sharding.param_shardings(
        lambda: cfg.module().init(jax.random.key(0), **cfg.example_inputs()), mesh=mesh)
    placed = sharding.place(params, shardings["params"])
    mlp = placed["encoder"]["layers"]["layers_1"]["mlp"]["wi"]["kernel"]
    assert mlp.sharding.spec == P("fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(placed))


def test_use_cpu_devices_splits_the_cores_before_the_backend_exists():
    """In a fresh process: the count takes effect; later calls report the backend's count;
    a count in XLA_FLAGS wins (this test process runs under one: 8 devices)."""
    script = ("import jax; from realm_jax import sharding; "
              "print(sharding.use_cpu_devices(3), len(jax.devices()), "
              "sharding.use_cpu_devices(5), len(jax.devices()))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["3", "3", "3", "3"]
    assert sharding.use_cpu_devices(2) == jax.device_count() == 8
