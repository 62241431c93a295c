"""Retriever towers: encoder + pooling + optional projection, and relevance scores."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from realm_jax.models.encoder import BertEncoder, EncoderConfig, bert_example_inputs
from realm_jax.models.layers import dense

Array = jax.Array

POOLINGS = ("cls", "pooler", "mean")


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
    """pooling: "cls" (first token's hidden state, as DPR), "pooler" (CLS through the
    dense+tanh pooler, as REALM), "mean" (masked mean, as sentence-transformers).
    projection_dim: REALM projects to 128 (dense + LayerNorm); None keeps the hidden size."""
    encoder: EncoderConfig
    pooling: str = "cls"
    projection_dim: int | None = None
    projection_layer_norm: bool = False
    normalize: bool = False
    example_inputs = staticmethod(bert_example_inputs)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "pooler" and not self.encoder.add_pooler:
            raise ValueError("pooling='pooler' needs an encoder with add_pooler=True")

    @property
    def output_dim(self) -> int:
        return self.projection_dim or self.encoder.hidden_size

    def module(self) -> "Embedder":
        return Embedder(self)


def mean_pool(hidden: Array, mask: Array) -> Array:
    mask = mask.astype(hidden.dtype)[..., None]
    return (hidden * mask).sum(axis=-2) / jnp.maximum(mask.sum(axis=-2), 1e-9)


class Embedder(nn.Module):
    """Maps token ids [B, T] to embeddings [B, output_dim] (float32)."""
    config: EmbedderConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden, pooled = BertEncoder(cfg.encoder, name="encoder")(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        if cfg.pooling == "cls":
            out = hidden[:, 0]
        elif cfg.pooling == "pooler":
            out = pooled
        else:
            out = mean_pool(hidden, attention_mask)
        if cfg.projection_dim:
            out = dense(cfg.projection_dim, ("embed", None), jnp.dtype(cfg.encoder.dtype),
                        name="projection")(out)
            if cfg.projection_layer_norm:
                out = nn.LayerNorm(epsilon=cfg.encoder.layer_norm_eps, name="projection_ln")(out)
        out = out.astype(jnp.float32)
        if cfg.normalize:
            out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return nn.with_logical_constraint(out, ("batch", None))


def relevance_scores(query: Array, documents: Array) -> Array:
    """Inner products: query [B, P] with documents [B, K, P] -> [B, K], or [N, P] -> [B, N]."""
    if documents.ndim == 3:
        return jnp.einsum("bp,bkp->bk", query, documents)
    return jnp.einsum("bp,np->bn", query, documents)
