"""Heads on the BERT-layout encoder: the MLM head (REALM's knowledge-augmented encoder)
and the ORQA span reader."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from realm_jax.models.encoder import BertEncoder, EncoderConfig, bert_example_inputs
from realm_jax.models.layers import ACTIVATIONS, dense, layer_norm, zeros_init

Array = jax.Array

# The reader's logit for a span outside the evidence (the reference implementation's value).
SPAN_MASK_SCORE = -10000.0


@dataclasses.dataclass(frozen=True)
class MaskedLMConfig:
    encoder: EncoderConfig
    example_inputs = staticmethod(bert_example_inputs)

    def module(self) -> "MaskedLM":
        return MaskedLM(self)


@dataclasses.dataclass(frozen=True)
class SpanReaderConfig:
    encoder: EncoderConfig
    span_hidden_size: int = 256
    max_span_width: int = 10
    reader_layer_norm_eps: float = 1e-3

    def module(self) -> "SpanReader":
        return SpanReader(self)

    def example_inputs(self) -> dict:
        return bert_example_inputs(evidence_mask=True)


class MaskedLM(nn.Module):
    """Encoder + MLM head (transform, LayerNorm, decoder tied to the word embeddings, bias).

    `positions` [B, M] (optional) selects where logits are computed, so a step only pays
    the vocabulary projection for the masked tokens. Returns logits [B, T or M, V]."""
    config: MaskedLMConfig

    def setup(self):
        enc = self.config.encoder
        dtype = jnp.dtype(enc.dtype)
        self.encoder = BertEncoder(enc.replace(add_pooler=False))
        self.transform = dense(enc.hidden_size, ("embed", "mlp"), dtype)
        self.transform_ln = layer_norm(enc.layer_norm_eps, dtype)
        self.bias = self.param("bias", zeros_init(("vocab",)), (enc.vocab_size,), jnp.float32)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, positions: Array | None = None, *,
                 deterministic: bool = True) -> Array:
        hidden, _ = self.encoder(input_ids, attention_mask, token_type_ids,
                                 deterministic=deterministic)
        if positions is not None:
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        h = ACTIVATIONS[self.config.encoder.activation](self.transform(hidden))
        h = self.transform_ln(h)
        logits = self.encoder.word_embeddings.attend(h).astype(jnp.float32) + self.bias
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def span_candidates(length: int, max_width: int) -> tuple[np.ndarray, np.ndarray]:
    """All (start, end) pairs with end - start < max_width, ordered by width then start."""
    starts = np.concatenate([np.arange(length - w + 1) for w in range(1, max_width + 1)])
    ends = np.concatenate([np.arange(w - 1, length) for w in range(1, max_width + 1)])
    return starts.astype(np.int32), ends.astype(np.int32)


class SpanReader(nn.Module):
    """Encoder + span head. `evidence_mask` [B, T] marks the tokens a span may cover (the
    passage, not the question, separators or padding). Returns (logits [B, S], starts [S],
    ends [S]) over the S candidate spans of width <= max_span_width."""
    config: SpanReaderConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array,
                 evidence_mask: Array, *, deterministic: bool = True):
        cfg = self.config
        dtype = jnp.dtype(cfg.encoder.dtype)
        hidden, _ = BertEncoder(cfg.encoder.replace(add_pooler=False), name="encoder")(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        projected = dense(2 * cfg.span_hidden_size, ("embed", "mlp"), dtype,
                          name="span_intermediate")(hidden)
        start_proj, end_proj = jnp.split(projected, 2, axis=-1)
        starts, ends = span_candidates(input_ids.shape[-1], cfg.max_span_width)
        h = jax.nn.relu(start_proj[:, starts] + end_proj[:, ends])
        h = nn.LayerNorm(epsilon=cfg.reader_layer_norm_eps, dtype=dtype, name="span_ln")(h)
        logits = dense(1, ("mlp", None), dtype, name="span_output")(h)[..., 0]
        evidence = evidence_mask.astype(bool)
        inside = evidence[:, starts] & evidence[:, ends]
        logits = logits.astype(jnp.float32) + jnp.where(inside, 0.0, SPAN_MASK_SCORE)
        return logits, jnp.asarray(starts), jnp.asarray(ends)
