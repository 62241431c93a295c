"""Pure linen models. Model configs are frozen dataclasses with `module()` and
`example_inputs()` (tiny inputs that trace the module); they turn into plain dicts and back
(`config_to_dict` / `config_from_dict`) for checkpoint metadata."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from realm_jax.models.bart import Bart, BartConfig
from realm_jax.models.encoder import BertEncoder, EncoderConfig
from realm_jax.models.heads import MaskedLM, MaskedLMConfig, SpanReader, SpanReaderConfig
from realm_jax.models.rag import Rag, RagConfig
from realm_jax.models.towers import Embedder, EmbedderConfig, relevance_scores

_CONFIG_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (EncoderConfig, EmbedderConfig, MaskedLMConfig, SpanReaderConfig,
                                 BartConfig, RagConfig)}


def register_config(cls: type) -> type:
    _CONFIG_TYPES[cls.__name__] = cls
    return cls


def config_to_dict(cfg) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(cfg).__name__}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = config_to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def config_from_dict(d: dict[str, Any]):
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in _CONFIG_TYPES:
        raise ValueError(f"unknown model config type {kind!r}; known: {sorted(_CONFIG_TYPES)}")
    fields = {k: (config_from_dict(v) if isinstance(v, dict) and "type" in v else v)
              for k, v in d.items()}
    return _CONFIG_TYPES[kind](**fields)


def abstract_params(cfg) -> dict:
    """Shapes/dtypes of `cfg.module()`'s params (unboxed), without allocating them."""
    module = cfg.module()
    return nn.unbox(jax.eval_shape(
        lambda: module.init(jax.random.key(0), **cfg.example_inputs())))["params"]


def _init_params(module: nn.Module, key: jax.Array, inputs: dict) -> dict:
    return nn.unbox(module.init(key, **inputs))["params"]


# One compiled init per model config in a process (op by op, an init compiles dozens of
# little programs); on CPU compiled cheaply: it runs once, its speed does not matter.
_init_jit = jax.jit(_init_params, static_argnums=0)
_init_cpu = jax.jit(_init_params, static_argnums=0, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def random_params(cfg, seed: int) -> dict:
    """Freshly initialised params of `cfg.module()` as host numpy arrays."""
    init = _init_cpu if jax.default_backend() == "cpu" else _init_jit
    params = init(cfg.module(), jax.random.key(seed), cfg.example_inputs())
    return jax.tree.map(np.asarray, jax.device_get(params))


__all__ = ["Bart", "BartConfig", "Rag", "RagConfig", "BertEncoder", "EncoderConfig", "Embedder",
           "EmbedderConfig", "MaskedLM", "MaskedLMConfig", "SpanReader", "SpanReaderConfig",
           "relevance_scores", "config_to_dict", "config_from_dict", "register_config",
           "abstract_params", "random_params"]
