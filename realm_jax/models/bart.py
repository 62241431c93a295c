"""BART: a post-LN encoder-decoder with learned positions, embedding LayerNorms and an LM
head tied to the shared token embedding (plus `final_logits_bias`), laid out so that
Hugging Face `BartModel` / `BartForConditionalGeneration` weights map onto it one to one
(see realm_jax/hf.py).

Incremental decoding keeps keys and values of the decoder's causal self-attention in the
"cache" collection:

    cache = init_cache(cfg, batch_size, max_length, encoder_length)    # zeros, index 0
    enc = model.apply({"params": p}, ids, mask, method=Bart.encode)
    logits, vars = model.apply({"params": p, "cache": cache}, step_ids, enc, mask,
                               decode=True, method=Bart.decode, mutable=["cache"])
    cache = vars["cache"]                                           # feed back next step

Each call appends `step_ids.shape[1]` positions (one, or a few for a prompt) at the cache's
index. The cross-attention keys/values are projected from the encoder states at the first
call and reused after (later calls still pass the same states). A beam search reorders the
cache with `reorder_cache(cache, beam_indices)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from realm_jax.models.encoder import Embed
from realm_jax.models.layers import (
    HIDDEN_AXES, BlockConfig, LayerStack, Replaceable, causal_mask, check_attention, layer_norm,
    padding_mask, zeros_init)

Array = jax.Array

# BartLearnedPositionalEmbedding looks position p up at row p + 2 (a fairseq legacy).
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class BartConfig(Replaceable):
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    dtype: str = "float32"        # compute dtype; parameters stay float32
    scan_layers: bool = False
    remat: bool = False
    hf_architecture: str = "BartForConditionalGeneration"   # what hf.save writes
    attention: str = "einsum"     # layers.ATTENTION_IMPLEMENTATIONS: "einsum", "xla", "cudnn"

    def __post_init__(self):
        check_attention(self.attention, "BartConfig.attention")

    def _block(self, heads: int, ffn: int, cross: bool) -> BlockConfig:
        return BlockConfig(
            hidden_size=self.d_model, num_heads=heads, intermediate_size=ffn,
            activation=self.activation_function, layer_norm_eps=self.layer_norm_eps,
            dropout_rate=self.dropout, attention_dropout_rate=self.attention_dropout,
            activation_dropout_rate=self.activation_dropout, dtype=self.dtype,
            cross_attention=cross, attention=self.attention)

    @property
    def encoder_block(self) -> BlockConfig:
        return self._block(self.encoder_attention_heads, self.encoder_ffn_dim, False)

    @property
    def decoder_block(self) -> BlockConfig:
        return self._block(self.decoder_attention_heads, self.decoder_ffn_dim, True)

    def module(self) -> "Bart":
        return Bart(self)

    def example_inputs(self) -> dict:
        ids = np.zeros((1, 2), np.int32)
        return dict(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=ids)


def shift_tokens_right(labels: Array, pad_token_id: int, decoder_start_token_id: int) -> Array:
    """Decoder inputs from labels, as Hugging Face builds them: prepend
    `decoder_start_token_id`, drop the last label, and turn -100 (ignored labels) into pad."""
    labels = jnp.asarray(labels)
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def _check_length(cfg: BartConfig, length: int, what: str) -> None:
    if length > cfg.max_position_embeddings:
        raise ValueError(f"{what} {length} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


def _add_positions(cfg: BartConfig, x: Array, positions: Array, deterministic: bool) -> Array:
    """Learned positions (offset 2), then `layernorm_embedding` and dropout. Called from a
    compact method: the submodules belong to the encoder or the decoder calling it."""
    table = Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model, (None, "embed"),
                  cfg.dtype, name="embed_positions")
    x = x + table(positions + POSITION_OFFSET)
    x = layer_norm(cfg.layer_norm_eps, jnp.dtype(cfg.dtype), "layernorm_embedding")(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, HIDDEN_AXES)


class BartEncoder(nn.Module):
    config: BartConfig

    @nn.compact
    def __call__(self, embedded: Array, attention_mask: Array, *, deterministic: bool = True
                 ) -> Array:
        cfg = self.config
        positions = jnp.arange(embedded.shape[1])[None, :]
        x = _add_positions(cfg, embedded, positions, deterministic)
        return LayerStack(cfg.encoder_block, cfg.encoder_layers, scan=cfg.scan_layers,
                          remat=cfg.remat, name="layers")(
            x, padding_mask(None, attention_mask), deterministic=deterministic)


class BartDecoder(nn.Module):
    config: BartConfig

    @nn.compact
    def __call__(self, embedded: Array, encoder_states: Array, encoder_mask: Array,
                 decoder_attention_mask: Array | None = None, *, decode: bool = False,
                 deterministic: bool = True) -> Array:
        cfg = self.config
        steps = embedded.shape[1]
        start = 0
        if decode:
            # Positions continue from where the cache stands (the layers keep their own
            # index for the keys and values; this one is for the position embeddings).
            initialized = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if initialized:
                start = position.value
                position.value = start + steps
        positions = (start + jnp.arange(steps))[None, :]
        x = _add_positions(cfg, embedded, positions, deterministic)

        mask = (None if decoder_attention_mask is None
                else padding_mask(None, decoder_attention_mask))
        if not decode:  # (decoding, the cache applies causality; the mask spans the cache)
            mask = causal_mask(steps) if mask is None else causal_mask(steps) & mask
        return LayerStack(cfg.decoder_block, cfg.decoder_layers, causal=True,
                          scan=cfg.scan_layers, remat=cfg.remat, name="layers")(
            x, mask, encoder_states, padding_mask(None, encoder_mask), decode=decode,
            deterministic=deterministic)


class Bart(nn.Module):
    """BART for conditional generation. `__call__` returns logits [B, T, V] (float32)."""
    config: BartConfig

    def setup(self):
        cfg = self.config
        self.shared = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.dtype)
        self.encoder = BartEncoder(cfg)
        self.decoder = BartDecoder(cfg)
        self.final_logits_bias = self.param("final_logits_bias", zeros_init(("vocab",)),
                                            (cfg.vocab_size,), jnp.float32)

    def _embed(self, ids: Array) -> Array:
        x = self.shared(ids)
        if not self.config.scale_embedding:
            return x
        return x * jnp.asarray(math.sqrt(self.config.d_model), x.dtype)

    def encode(self, input_ids: Array, attention_mask: Array | None = None, *,
               deterministic: bool = True) -> Array:
        """Encoder states [B, S, D] (in the compute dtype)."""
        _check_length(self.config, input_ids.shape[-1], "input length")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return self.encoder(self._embed(input_ids), attention_mask, deterministic=deterministic)

    def decode(self, decoder_input_ids: Array, encoder_states: Array,
               encoder_mask: Array | None = None, decoder_attention_mask: Array | None = None,
               decode: bool = False, *, deterministic: bool = True) -> Array:
        """Logits [B, T, V] (float32) for `decoder_input_ids` [B, T].

        decode=False: the whole target at once (teacher forcing); `decoder_attention_mask`
        [B, T] masks padded keys. decode=True (with the "cache" collection mutable): the
        T new positions that follow those already in the cache; `decoder_attention_mask`
        is then [B, max_length] over the whole cache (or None)."""
        if not decode:
            _check_length(self.config, decoder_input_ids.shape[-1], "decoder input length")
        if encoder_mask is None:
            encoder_mask = jnp.ones(encoder_states.shape[:2], jnp.int32)
        h = self.decoder(self._embed(decoder_input_ids), encoder_states, encoder_mask,
                         decoder_attention_mask, decode=decode, deterministic=deterministic)
        # the LM head: tied to the shared embedding, plus final_logits_bias
        logits = self.shared.attend(h).astype(jnp.float32) + self.final_logits_bias
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def __call__(self, input_ids: Array, attention_mask: Array | None,
                 decoder_input_ids: Array, decoder_attention_mask: Array | None = None, *,
                 deterministic: bool = True) -> Array:
        states = self.encode(input_ids, attention_mask, deterministic=deterministic)
        return self.decode(decoder_input_ids, states, attention_mask, decoder_attention_mask,
                           deterministic=deterministic)


def init_cache(config: BartConfig, batch_size: int, max_length: int, encoder_length: int) -> dict:
    """The empty decoding cache for `batch_size` sequences of up to `max_length` target
    positions, attending to encoder states of `encoder_length` positions. Needs no
    parameters (shapes come from `jax.eval_shape`). It holds, per decoder layer, the
    self-attention keys/values with their index and the cross-attention keys/values (see
    the module docstring)."""
    _check_length(config, max_length, "max_length")
    model = config.module()
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    states = jnp.zeros((batch_size, encoder_length, config.d_model), jnp.dtype(config.dtype))

    def init():
        return model.init(jax.random.key(0), ids, states, decode=True, method=Bart.decode)["cache"]

    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


def reorder_cache(cache: Any, indices: Array) -> Any:
    """Gather the cache's sequences along the batch axis (beam search: `indices` [B] names,
    for every new row, the row it continues). The self- and cross-attention keys/values are
    [..., B, length, heads, head_dim] (a leading layer axis under nn.scan) and are gathered;
    the indices, positions and flags are shared by the batch and kept."""
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=x.ndim - 4) if x.ndim >= 4 else x,
                        cache)
