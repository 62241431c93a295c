"""The Transformer core shared by the BERT-layout encoder and BART.

Both are post-LayerNorm: every sub-layer (self-attention, optional cross-attention,
feed-forward) is followed by `LayerNorm(x + sublayer(x))`. Parameters carry logical
axis names; activations carry logical constraints (see realm_jax/sharding.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Activation layout names (batch, length, embed) used by every block.
HIDDEN_AXES = ("batch", "length", "embed")

# How attention is computed (the `attention` field of the model configs):
#   "einsum": `dot_product_attention` below (supports dropout);
#   "xla":    `jax.nn.dot_product_attention(implementation="xla")`;
#   "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused (flash)
#             attention: NVIDIA GPUs, bfloat16/float16 compute, head_dim a multiple of 8.
# jax.nn.dot_product_attention has no dropout: while attention dropout is active (rate > 0,
# training) a block uses "einsum" whatever the setting.
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def check_attention(value: str, field: str) -> str:
    """`value` if it names an attention implementation, else a ValueError naming `field`."""
    if value not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{field}={value!r}: must be one of {ATTENTION_IMPLEMENTATIONS}")
    return value


def param_init(axes: tuple[str | None, ...], std: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(eps: float, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=zeros_init(("embed",)))


def dense(features: int, axes: tuple[str | None, str | None], dtype: Any,
          name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=param_init(axes),
                    bias_init=zeros_init(axes[1:]), name=name)


class Projection(nn.Module):
    """A dense layer with multi-axis input and output features, e.g. [D] -> [N, H] for
    attention heads, or [N, H] -> [D] for the attention output (contracting the last
    `len(in_axes)` input dims)."""
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", param_init(self.in_axes + self.out_axes),
                            self.in_shape + self.out_shape, jnp.float32)
        bias = self.param("bias", zeros_init(self.out_axes), self.out_shape, jnp.float32)
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                (contract, ((), ())))
        return y + bias.astype(self.dtype)


class Replaceable:
    """`replace(**changes)`: a copy of a (frozen) dataclass config with fields changed."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Hyper-parameters of one post-LN Transformer block."""
    hidden_size: int
    num_heads: int
    intermediate_size: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: str = "float32"
    cross_attention: bool = False
    activation_dropout_rate: float = 0.0   # after the feed-forward activation (BART)
    attention: str = "einsum"              # ATTENTION_IMPLEMENTATIONS (checked by the models)

    @property
    def head_dim(self) -> int:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self.hidden_size // self.num_heads


def padding_mask(query_valid: Array | None, key_valid: Array) -> Array:
    """Boolean attention mask [batch, 1, query, key] from [batch, length] validity masks."""
    mask = key_valid.astype(bool)[:, None, None, :]
    if query_valid is not None:
        mask = mask & query_valid.astype(bool)[:, None, :, None]
    return mask


def causal_mask(length: int) -> Array:
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def dot_product_attention(query: Array, key: Array, value: Array, mask: Array | None = None,
                          dropout: Callable[[Array], Array] | None = None) -> Array:
    """softmax(q k^T / sqrt(head_dim), masked) v for query [B, T, N, H] and key, value
    [B, S, N, H]; `mask` (True: may attend) broadcasts to [B, N, T, S].

    Scores and softmax statistics are float32. The weights are normalised after the
    product with the values (T x H divisions instead of T x S), and the mask is an additive
    bias: faster on XLA:CPU than `jax.nn.dot_product_attention`. `dropout` acts on the
    unnormalised weights, which equals dropping the normalised ones (the normaliser is taken
    before it). A row that may attend nowhere averages all values rather than giving NaN."""
    dtype = query.dtype
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # [B, N, T, H]
    scale = jnp.asarray(1.0 / query.shape[-1] ** 0.5, dtype)
    logits = jnp.einsum("bnth,bnsh->bnts", query * scale, key,
                        preferred_element_type=jnp.float32)
    if mask is not None:
        logits = logits + jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    total = weights.sum(-1, keepdims=True)
    if dropout is not None:
        weights = dropout(weights)
    out = jnp.einsum("bnts,bnsh->bnth", weights.astype(dtype), value,
                     preferred_element_type=jnp.float32) / total
    return jnp.swapaxes(out, 1, 2).astype(dtype)


def attend(query: Array, key: Array, value: Array, mask: Array | None,
           dropout: Callable[[Array], Array] | None, implementation: str) -> Array:
    """Attention by `implementation` (ATTENTION_IMPLEMENTATIONS); "einsum" while `dropout`
    is given. Shapes as `dot_product_attention`."""
    if implementation == "einsum" or dropout is not None:
        return dot_product_attention(query, key, value, mask, dropout)
    if mask is not None and implementation == "cudnn":
        # cuDNN takes the mask as a bias spanning [query, key] (a padding mask [B, 1, 1, S]
        # does not broadcast there).
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (query.shape[1], key.shape[1]))
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        implementation=implementation)


class Attention(nn.Module):
    """Multi-head attention (`attend`, by the config's `attention`).

    With `decode=True` and `cached=True` (causal self-attention of a decoder), keys and
    values are kept in the "cache" collection: initialise it by calling once with the full
    target length; later calls take one position at a time.

    With `decode=True` and `cache_context=True` (a decoder's cross-attention), the keys and
    values of the context are projected at the first call after the cache is initialised
    and reused by later calls (which still pass the context, unread).
    """
    config: BlockConfig
    cached: bool = False
    cache_context: bool = False

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None,
                 *, decode: bool = False, deterministic: bool = True) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        context = x if context is None else context

        def project(name, inputs):
            out = Projection((cfg.hidden_size,), (cfg.num_heads, cfg.head_dim), ("embed",),
                             ("heads", "kv"), dtype, name=name)(inputs)
            return nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))

        def project_context(module, inputs):
            del module  # (nn.cond's branch signature; the projections join the current scope)
            return project("key", inputs), project("value", inputs)

        query = project("query", x)
        if self.cache_context and decode:
            key, value = self._context_cache(project_context, context)
        else:
            key, value = project_context(self, context)

        if self.cached and decode:
            key, value, mask = self._update_cache(key, value, mask)

        dropout = None
        if cfg.attention_dropout_rate > 0.0 and not deterministic:
            dropout = functools.partial(nn.Dropout(cfg.attention_dropout_rate),
                                        deterministic=False)
        out = attend(query, key, value, mask, dropout, cfg.attention)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        out = Projection((cfg.num_heads, cfg.head_dim), (cfg.hidden_size,), ("heads", "kv"),
                         ("embed",), dtype, name="out")(out)
        return nn.with_logical_constraint(out, HIDDEN_AXES)

    def _context_cache(self, project_context, context: Array) -> tuple[Array, Array]:
        initialized = self.has_variable("cache", "context_key")
        if not initialized:  # the initialising call: shapes only
            key, value = project_context(self, context)
            self.variable("cache", "context_key", jnp.zeros, key.shape, key.dtype)
            self.variable("cache", "context_value", jnp.zeros, value.shape, value.dtype)
            self.variable("cache", "context_ready", lambda: jnp.zeros((), bool))
            return key, value

        def reuse(module, inputs):
            del inputs
            return (module.get_variable("cache", "context_key"),
                    module.get_variable("cache", "context_value"))

        cached_shape = self.get_variable("cache", "context_key").shape
        if cached_shape[:2] != context.shape[:2]:
            raise ValueError(f"the cache holds keys/values for a context of [batch, length] "
                             f"{cached_shape[:2]}, got {context.shape[:2]}")
        ready = self.variable("cache", "context_ready", lambda: jnp.zeros((), bool))
        key, value = nn.cond(ready.value, reuse, project_context, self, context)
        self.put_variable("cache", "context_key", key)
        self.put_variable("cache", "context_value", value)
        ready.value = jnp.ones((), bool)
        return key, value

    def _update_cache(self, key: Array, value: Array, mask: Array | None):
        # (Named apart from the "key"/"value" projections, which share this scope.)
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # the initialising call sees the full length; nothing to read yet
            return key, value, mask
        batch, steps, heads, head_dim = key.shape
        max_length = cached_key.value.shape[1]
        start = index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                                          (0, start, 0, 0))
        index.value = start + steps
        # Query position start+t sees cached positions <= start+t.
        query_pos = start + jnp.arange(steps)
        visible = jnp.arange(max_length)[None, :] <= query_pos[:, None]
        step_mask = jnp.broadcast_to(visible[None, None], (batch, 1, steps, max_length))
        if mask is not None:
            step_mask = step_mask & mask
        return cached_key.value, cached_value.value, step_mask


class MLP(nn.Module):
    config: BlockConfig

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), dtype, "wi")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = ACTIVATIONS[cfg.activation](h)
        if cfg.activation_dropout_rate > 0.0:
            h = nn.Dropout(cfg.activation_dropout_rate)(h, deterministic=deterministic)
        h = dense(cfg.hidden_size, ("mlp", "embed"), dtype, "wo")(h)
        return nn.with_logical_constraint(h, HIDDEN_AXES)


class PostLNBlock(nn.Module):
    """Self-attention [+ cross-attention] + feed-forward, each as LayerNorm(x + f(x))."""
    config: BlockConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, context: Array | None = None,
                 context_mask: Array | None = None, decode: bool = False,
                 deterministic: bool = True) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        drop = nn.Dropout(cfg.dropout_rate)

        def residual(h, update, ln_name):
            update = drop(update, deterministic=deterministic)
            return layer_norm(cfg.layer_norm_eps, dtype, ln_name)(h + update)

        h = Attention(cfg, cached=self.causal, name="attention")(
            x, mask=mask, decode=decode, deterministic=deterministic)
        x = residual(x, h, "attention_ln")
        if cfg.cross_attention:
            h = Attention(cfg, cache_context=True, name="cross_attention")(
                x, context, mask=context_mask, decode=decode, deterministic=deterministic)
            x = residual(x, h, "cross_attention_ln")
        h = MLP(cfg, name="mlp")(x, deterministic=deterministic)
        x = residual(x, h, "mlp_ln")
        return nn.with_logical_constraint(x, HIDDEN_AXES)


class LayerStack(nn.Module):
    """`num_layers` blocks, unrolled (params `layers_0` ...) or under `nn.scan`
    (params stacked along a leading "layers" axis under `layers`), optionally rematerialized."""
    config: BlockConfig
    num_layers: int
    causal: bool = False
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, context: Array | None = None,
                 context_mask: Array | None = None, *, decode: bool = False,
                 deterministic: bool = True) -> Array:
        block = PostLNBlock
        if self.remat:
            block = nn.remat(block, static_argnums=(5, 6),
                             policy=jax.checkpoint_policies.nothing_saveable)
        if not self.scan:
            for i in range(self.num_layers):
                x = block(self.config, self.causal, name=f"layers_{i}")(
                    x, mask, context, context_mask, decode, deterministic)
            return x

        def body(module, carry, mask, context, context_mask):
            return module(carry, mask, context, context_mask, decode, deterministic), None

        scanned = nn.scan(
            body, variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True}, length=self.num_layers,
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            metadata_params={nn.PARTITION_NAME: "layers"})
        return scanned(block(self.config, self.causal, name="layers"), x, mask, context,
                       context_mask)[0]
