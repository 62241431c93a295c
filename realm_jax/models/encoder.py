"""BERT-layout encoder: word + position + type embeddings, post-LN blocks, optional pooler."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from realm_jax.models.layers import (
    HIDDEN_AXES, BlockConfig, LayerStack, Replaceable, check_attention, dense, layer_norm,
    padding_mask, param_init)

Array = jax.Array


def bert_example_inputs(**extra_masks: bool) -> dict:
    """Tiny dummy inputs that trace a BERT-layout module's __call__ (for init / eval_shape);
    each name in `extra_masks` is one more all-ones [1, 2] input (e.g. evidence_mask)."""
    ids = np.zeros((1, 2), np.int32)
    inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=ids)
    inputs.update({name: np.ones_like(ids) for name in extra_masks})
    return inputs


@dataclasses.dataclass(frozen=True)
class EncoderConfig(Replaceable):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    pad_token_id: int = 0
    add_pooler: bool = True
    dtype: str = "float32"        # compute dtype; parameters stay float32
    scan_layers: bool = False
    remat: bool = False
    attention: str = "einsum"     # layers.ATTENTION_IMPLEMENTATIONS: "einsum", "xla", "cudnn"
    example_inputs = staticmethod(bert_example_inputs)

    def __post_init__(self):
        check_attention(self.attention, "EncoderConfig.attention")

    @property
    def block(self) -> BlockConfig:
        return BlockConfig(
            hidden_size=self.hidden_size, num_heads=self.num_heads,
            intermediate_size=self.intermediate_size, activation=self.activation,
            layer_norm_eps=self.layer_norm_eps, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
            attention=self.attention)

    def module(self) -> "BertEncoder":
        return BertEncoder(self)


class Embed(nn.Module):
    """An embedding table with logical axes; `attend` gives tied output logits."""
    num: int
    features: int
    axes: tuple[str | None, str | None]
    dtype: str = "float32"

    def setup(self):
        self.embedding = self.param("embedding", param_init(self.axes), (self.num, self.features),
                                    jnp.float32)

    def __call__(self, ids: Array) -> Array:
        # Gather from a table whole along its first axis: a lookup into a vocab-sharded
        # table would otherwise be replicated and re-partitioned by the compiler.
        table = nn.with_logical_constraint(self.embedding, (None, "embed"))
        return jnp.take(table, ids, axis=0).astype(jnp.dtype(self.dtype))

    def attend(self, x: Array) -> Array:
        return jnp.einsum("...d,vd->...v", x, self.embedding.astype(jnp.dtype(self.dtype)))


class BertEncoder(nn.Module):
    """Returns (sequence_output [B, T, D], pooled_output [B, D] or None)."""
    config: EncoderConfig

    def setup(self):
        cfg = self.config
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), cfg.dtype)
        self.position_embeddings = Embed(
            cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), cfg.dtype)
        self.token_type_embeddings = Embed(
            cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), cfg.dtype)
        self.embeddings_ln = layer_norm(cfg.layer_norm_eps, jnp.dtype(cfg.dtype))
        self.embeddings_dropout = nn.Dropout(cfg.dropout_rate)
        self.layers = LayerStack(cfg.block, cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat)
        if cfg.add_pooler:
            self.pooler = dense(cfg.hidden_size, ("embed", "mlp"), jnp.dtype(cfg.dtype))

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, deterministic: bool = True):
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        x = self.embeddings_ln(x)
        x = self.embeddings_dropout(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, HIDDEN_AXES)
        x = self.layers(x, padding_mask(None, attention_mask), deterministic=deterministic)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if cfg.add_pooler else None
        return x, pooled
