"""Inverse Cloze Task examples (ORQA, Lee et al. 2019) from a block store.

An example is one sentence of a block as the pseudo-query and the block as its context. With
probability ``remove_probability`` (0.9 in ORQA) the sentence is removed from the context, so
the towers must match a sentence to its surroundings; otherwise it stays, so they also learn
that word overlap matters. The sentence and the removal are drawn from a generator seeded per
element (the pipeline's), so a resumed run draws the same examples.

Rows (token ids of the block re-tokenized with its character offsets; they equal the store's
tokens, which is checked):

    query    [CLS] sentence [SEP]                           padded to query_length
    context  [CLS] (title [SEP])? block - sentence [SEP]    padded to context_length

with the layout of the corpus embedder's rows (`realm_jax.data.rows`); titles as the store's
mode says (DPR passages: titles; REALM blocks: none) unless ``title`` is given. Sentences are
cut as the REALM query maker cuts them (`realm_jax.data.spans.split_sentences`, never inside
a stored span); a block needs at least two sentences to give an example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from realm_jax.data.blocks import load_tokenizer
from realm_jax.data.pipeline import LruCache, check_batch_split, host_share
from realm_jax.data.realm_examples import special_ids
from realm_jax.data.rows import row
from realm_jax.data.spans import split_sentences
from realm_jax.data.store import BlockStore

ICT_FIELDS = ("query_input_ids", "query_attention_mask", "context_input_ids",
              "context_attention_mask")


@dataclasses.dataclass(frozen=True)
class BlockSentences:
    """A block's wordpieces and its sentences as wordpiece ranges [start, end)."""

    ids: np.ndarray
    sentences: tuple[tuple[int, int], ...]
    title_ids: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class IctExample:
    """One ICT example; arrays int32 [query_length] and [context_length]."""

    query_input_ids: np.ndarray
    query_attention_mask: np.ndarray
    context_input_ids: np.ndarray
    context_attention_mask: np.ndarray
    block_id: int
    sentence: int     # index of the query sentence in the block
    removed: bool     # whether the sentence was removed from the context


class IctExampleMaker:
    """Makes ICT examples from the blocks of ``store``.

    Args:
      store: the block store.
      tokenizer: the local Hugging Face folder the store was made with (checked).
      query_length: query rows' length with [CLS] and [SEP] (a longer sentence loses its end).
      context_length: context rows' length (a longer block loses its end).
      remove_probability: chance that the query sentence is removed from the context.
      title: prepend the block's title to the context; None: as the store's mode (DPR: yes).
      cache_size: tokenized blocks kept (LRU).
    """

    def __init__(self, store: BlockStore, tokenizer: Any, *, query_length: int = 64,
                 context_length: int = 288, remove_probability: float = 0.9,
                 title: bool | None = None, cache_size: int = 4096):
        if not 0.0 <= remove_probability <= 1.0:
            raise ValueError(f"remove_probability must be in [0, 1], got {remove_probability}")
        if query_length < 3:
            raise ValueError(f"query_length must be >= 3, got {query_length}")
        self.store = store
        self.tokenizer = load_tokenizer(tokenizer)
        store.check_tokenizer(repr(self.tokenizer.name), self.tokenizer.vocab_hash)
        self.special = special_ids(self.tokenizer)
        self.query_length = int(query_length)
        self.context_length = int(context_length)
        self.remove_probability = float(remove_probability)
        self.title = store.settings.get("mode") == "dpr" if title is None else bool(title)
        row(np.zeros(1), self.context_length, cls_id=0, sep_id=0,
            title_ids=[] if self.title else None)  # validates the length
        self._cache = LruCache(cache_size)

    def sentences(self, block_id: int) -> BlockSentences:
        """Block ``block_id``'s wordpieces and sentences (cached)."""
        return self._cache.get(int(block_id), self._split)

    def _split(self, block_id: int) -> BlockSentences:
        record = self.store.record(block_id)
        encoding = self.tokenizer.encode_batch([record.text])[0]
        ids = np.asarray(encoding.ids, np.int32)
        if len(ids) != len(record.tokens):
            raise ValueError(
                f"block {block_id} of {self.store.path}: the tokenizer gives {len(ids)} "
                f"wordpieces, the store holds {len(record.tokens)}; use the tokenizer the "
                "store was prepared with")
        starts = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)[:, 0]
        ranges = []
        for c0, c1 in split_sentences(record.text, [(s, e) for s, e, _ in record.spans]):
            t0, t1 = np.searchsorted(starts, [c0, c1], side="left").tolist()
            if t1 > t0:
                ranges.append((int(t0), int(t1)))
        title_ids = None
        if self.title:
            title_ids = np.asarray(self.tokenizer.encode_batch([record.title])[0].ids, np.int32)
        return BlockSentences(ids, tuple(ranges), title_ids)

    def example(self, block_id: int, rng: np.random.Generator) -> IctExample | None:
        """An example of block ``block_id`` drawn with ``rng`` (a sentence, then whether it is
        removed); None for a block with fewer than two sentences."""
        block = self.sentences(block_id)
        if len(block.sentences) < 2:
            return None
        index = int(rng.integers(len(block.sentences)))
        removed = bool(rng.random() < self.remove_probability)
        t0, t1 = block.sentences[index]
        sp = self.special
        query = row(block.ids[t0:t1], self.query_length, cls_id=sp.cls, sep_id=sp.sep,
                    pad_id=sp.pad)
        text = np.concatenate([block.ids[:t0], block.ids[t1:]]) if removed else block.ids
        context = row(text, self.context_length, cls_id=sp.cls, sep_id=sp.sep, pad_id=sp.pad,
                      title_ids=block.title_ids)
        return IctExample(*query, *context, int(block_id), index, removed)

    def first_usable_block(self, block_ids: Sequence[int] | np.ndarray) -> int:
        """The first of ``block_ids`` with at least two sentences; a clear error if none
        has."""
        for b in np.asarray(block_ids).reshape(-1).tolist():
            if len(self.sentences(b).sentences) >= 2:
                return int(b)
        raise ValueError(f"ICT: no block of {self.store.path} (among the {len(block_ids)} "
                         "given) has two or more sentences, so none gives a query with a "
                         "context; ICT needs multi-sentence blocks (a REALM-mode store of "
                         "running text, or longer passages)")


def collate_ict(examples: Sequence[IctExample]) -> dict[str, np.ndarray]:
    """Stacks examples: the row fields int32 [B, L], ``block_id`` int64 [B], ``removed``
    bool [B]."""
    if not examples:
        raise ValueError("no ICT examples to collate")
    batch = {f: np.stack([getattr(e, f) for e in examples]) for f in ICT_FIELDS}
    batch["block_id"] = np.array([e.block_id for e in examples], np.int64)
    batch["removed"] = np.array([e.removed for e in examples], bool)
    return batch


def ict_dataset(maker: IctExampleMaker, batch_size: int, seed: int, *,
                block_ids: np.ndarray | None = None, process_index: int = 0,
                process_count: int = 1) -> grain.IterDataset:
    """Batches of ICT examples: the blocks (``block_ids``, default all) in a seeded shuffled
    order repeated forever, one example per block drawn with a per-element seed (blocks with
    fewer than two sentences skipped), this host's share of every global batch. The
    iterator's position (``get_state`` / ``set_state``) goes with each checkpoint.

    Fails at once when no block has two sentences (the endless pipeline would otherwise
    search forever)."""
    check_batch_split(batch_size, process_count)
    if block_ids is not None and not len(block_ids):
        raise ValueError("ict_dataset: no blocks to draw examples from")
    ids = np.arange(len(maker.store)) if block_ids is None else np.asarray(block_ids, np.int64)
    maker.first_usable_block(ids)
    ds = grain.MapDataset.range(len(ids)) if block_ids is None else grain.MapDataset.source(ids)
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.random_map(lambda b, rng: maker.example(int(b), rng), seed=seed)
    ds = ds.to_iter_dataset().batch(batch_size, batch_fn=collate_ict)
    return host_share(ds, process_index, process_count)
