"""Embedding texts with a retriever tower: tokenize, bucket by length, run a jitted
(optionally sharded) forward pass, return numpy.

    from realm_jax import TextEmbedder
    embedder = TextEmbedder.from_hf("/path/to/all-MiniLM-L6-v2")
    vectors = embedder.embed(["first text", "second text"])   # np.float32 [2, 384]
"""

from __future__ import annotations

import bisect
import collections
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from realm_jax import hf, sharding
from realm_jax.models.towers import EmbedderConfig

# Padded lengths: every batch is padded to the smallest bucket that holds its longest row,
# so a corpus compiles a bounded set of shapes and short texts do not pay for long ones.
# Steps of 16 (32 past 256): finer steps pad less and compile more shapes, each once per
# process (the padding each step size leaves: docs/experiments.md).
LENGTH_BUCKETS = tuple(range(16, 257, 16)) + tuple(range(288, 513, 32))


def bucket_length(length: int, max_length: int) -> int:
    buckets = [b for b in LENGTH_BUCKETS if b < max_length] + [max_length]
    return buckets[min(bisect.bisect_left(buckets, length), len(buckets) - 1)]


def embed_rows(forward: Callable[[np.ndarray, np.ndarray], Any], row: Callable[[int], Any],
               lengths: np.ndarray, out: np.ndarray, *, batch_size: int,
               batch_rows: Callable[[int], int], max_length: int, pad_id: int,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """`out[i]` = the embedding of row i (`row(i)`: its token ids, `lengths[i]` of them after
    truncation) for every row, in batches of similar length (longest first: a progress bar
    shows the slowest part first) padded to `batch_rows(rows in the batch)` rows of a
    bucketed width: `forward(ids, mask)` on int32 [rows, width] arrays."""
    pending: collections.deque = collections.deque()
    order = np.argsort(-np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = bucket_length(int(lengths[idx].max()), max_length)
        size = batch_rows(len(idx))
        ids = np.full((size, width), pad_id, np.int32)
        mask = np.zeros((size, width), np.int32)
        for r, i in enumerate(idx.tolist()):
            tokens = row(i)[:width]
            ids[r, :len(tokens)] = tokens
            mask[r, :len(tokens)] = 1
        mask[len(idx):, 0] = 1  # filler rows: one visible token keeps them finite
        pending.append((idx, forward(ids, mask)))
        if len(pending) > 2:  # the devices work while the host builds the next batch
            _collect(pending.popleft(), out, progress)
    for item in pending:
        _collect(item, out, progress)
    return out


def _forward(module, dtype: str, params, ids, mask):
    return module.apply({"params": params}, ids, mask).astype(jnp.dtype(dtype))


def tower_forward(config: EmbedderConfig, mesh: Mesh, rules=sharding.DEFAULT_RULES,
                  dtype: str = "float32"):
    """(forward(params, ids, mask) -> embeddings cast to `dtype` on the devices, the params'
    shardings): the tower's jitted pass with the batch sharded over the mesh's data axes.
    The jitted function is module-level with static (module, dtype), so embedders of the
    same tower on the same mesh share their compiled shapes."""
    shardings = sharding.model_shardings(config, mesh, rules)
    batch = sharding.batch_sharding(mesh)
    jitted = jax.jit(_forward, static_argnums=(0, 1), in_shardings=(shardings, batch, batch),
                     out_shardings=batch)
    return functools.partial(jitted, config.module(), dtype), shardings


def _collect(item, out: np.ndarray, progress) -> None:
    idx, result = item
    out[idx] = np.asarray(result)[:len(idx)]
    if progress is not None:
        progress(len(idx))


class TextEmbedder:
    """A retriever tower with its tokenizer. `embed` takes texts, `embed_token_ids` takes
    already tokenized rows (with special tokens)."""

    def __init__(self, config: EmbedderConfig, params, tokenizer=None, *, max_length: int = 512,
                 mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES):
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = min(max_length, config.encoder.max_position_embeddings)
        self.mesh = mesh or sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
        self.rules = rules
        self._forward, shardings = tower_forward(config, self.mesh, rules)
        self.params = sharding.place(params, shardings)

    @classmethod
    def from_hf(cls, folder: str | os.PathLike, *, pooling: str | None = None,
                normalize: bool | None = None, max_length: int | None = None,
                mesh: Mesh | None = None, **overrides) -> "TextEmbedder":
        """Load a retriever tower (BERT/sentence-transformers, DPR or REALM embedder)."""
        config, params = hf.load_embedder(folder, pooling=pooling, normalize=normalize, **overrides)
        if max_length is None:
            st = Path(folder) / "sentence_bert_config.json"
            max_length = (json.loads(st.read_text()).get("max_seq_length", 512) if st.exists()
                          else 512)
        return cls(config, params, hf.load_tokenizer(folder), max_length=max_length, mesh=mesh)

    @property
    def dim(self) -> int:
        return self.config.output_dim

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError("this TextEmbedder has no tokenizer; use embed_token_ids")
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              add_special_tokens=True)["input_ids"]

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False
              ) -> np.ndarray:
        return self.embed_token_ids(self.tokenize(texts), batch_size=batch_size, progress=progress)

    def embed_token_ids(self, rows: Sequence[Sequence[int]], batch_size: int = 32,
                        progress: bool = False, pad_id: int | None = None) -> np.ndarray:
        """Embeddings [len(rows), dim] float32, in the order of `rows`."""
        from tqdm.auto import tqdm

        n = len(rows)
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        batch_size = sharding.batch_multiple(batch_size, self.mesh)
        pad_id = self.config.encoder.pad_token_id if pad_id is None else pad_id
        lengths = np.fromiter((min(len(r), self.max_length) for r in rows), np.int64, n)
        with sharding.activate(self.mesh, self.rules), tqdm(
                total=n, unit="doc", desc="embedding", smoothing=0.1, disable=not progress) as bar:
            return embed_rows(lambda ids, mask: self._forward(self.params, ids, mask),
                              lambda i: rows[i], lengths, out, batch_size=batch_size,
                              batch_rows=lambda _: batch_size, max_length=self.max_length,
                              pad_id=pad_id, progress=bar.update)
