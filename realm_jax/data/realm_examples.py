"""REALM pre-training queries: one sentence with one salient span masked.

For every sentence of a block, :class:`QueryMaker` collects the salient spans inside it (the
block's link anchors or pre-annotated spans, plus what the span finder finds), drops those
whose mask would be longer than ``max_mask_tokens`` wordpieces or would not fit, picks one
at random (deterministically from the seed, the block id and the sentence index) and masks
every wordpiece that overlaps it. The query is ``[CLS] sentence [SEP]`` padded to
``query_length``; a longer sentence is cut to a window around the span. Sentences that give
no query are counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from realm_jax.data.blocks import TokenizerInfo, load_tokenizer
from realm_jax.data.rows import row
from realm_jax.data.spans import (AnchorFilter, CapitalizedPhraseFinder, CombinedFinder,
                                  DateFinder, SalientSpan, SpanFinder, anchor_spans,
                                  resolve_overlaps, split_sentences)
from realm_jax.data.store import BlockStore
from realm_jax.data.wikitext import Span

# Why a sentence gives no query; when several spans fail, the first reason in this order.
SKIP_REASONS = ("no_salient_span", "span_too_long", "mask_cut_off", "too_little_context",
                "span_without_tokens")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The tokenizer's special token ids."""

    cls: int
    sep: int
    mask: int
    pad: int


def special_ids(tokenizer: TokenizerInfo) -> SpecialIds:
    """[CLS], [SEP], [MASK], [PAD] ids (or <s>, </s>, <mask>, <pad>); a clear error if absent."""
    def find(*names: str) -> int:
        for name in names:
            i = tokenizer.backend.token_to_id(name)
            if i is not None:
                return int(i)
        raise ValueError(f"tokenizer {tokenizer.name!r} has no {' or '.join(names)} token")

    return SpecialIds(find("[CLS]", "<s>"), find("[SEP]", "</s>"), find("[MASK]", "<mask>"),
                      find("[PAD]", "<pad>"))


@dataclasses.dataclass(frozen=True)
class MaskedQuery:
    """One masked query. Arrays: ``input_ids``, ``attention_mask`` int32 [Q];
    ``mask_positions``, ``mask_targets`` int32 [M] and ``mask_valid`` bool [M] (padding: 0,
    0, False). ``mask_positions`` index ``input_ids`` (the [CLS] is position 0)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    mask_positions: np.ndarray
    mask_targets: np.ndarray
    mask_valid: np.ndarray
    block_id: int          # the block the sentence came from (-1 if none)
    doc_index: int         # ordinal of the source document in the store (for exclusion)
    doc_id: str            # the corpus's id of the source document
    sentence: str          # the whole sentence, unmasked
    span: SalientSpan      # the masked span, offsets relative to ``sentence``

    @property
    def span_text(self) -> str:
        return self.sentence[self.span.start:self.span.end]


class QueryMaker:
    """Turns block texts into masked queries.

    Args:
      tokenizer: a local Hugging Face folder or a loaded tokenizer (wordpiece, with offsets).
      finder: finds salient spans in the text, in addition to the given ``spans``; None for
        the given spans only.
      anchors: which given spans to use: ``"entities"`` (entity-like link anchors, for
        Wikipedia), ``"all"`` (e.g. pre-annotated spans) or ``"none"``.
      query_length: Q, the query length with [CLS] and [SEP] (96 in REALM).
      max_mask_tokens: M, the most wordpieces one mask may cover (10 in REALM).
      window: cut sentences longer than Q - 2 wordpieces to a window around the span; when
        False, keep their start and skip those whose mask falls outside (``mask_cut_off``).
      min_context_tokens: skip a span leaving fewer unmasked wordpieces in the query.
    """

    def __init__(self, tokenizer: str | Any, *, finder: SpanFinder | None = None,
                 anchors: AnchorFilter = "entities", query_length: int = 96,
                 max_mask_tokens: int = 10, window: bool = True, min_context_tokens: int = 2):
        if max_mask_tokens < 1 or query_length < max_mask_tokens + 2:
            raise ValueError(f"need 1 <= max_mask_tokens <= query_length - 2, got "
                             f"max_mask_tokens={max_mask_tokens}, query_length={query_length}")
        if anchors not in ("entities", "all", "none"):
            raise ValueError(f"anchors must be 'entities', 'all' or 'none', got {anchors!r}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.special = special_ids(self.tokenizer)
        self.finder = finder
        self.anchors = anchors
        self.query_length = query_length
        self.max_mask_tokens = max_mask_tokens
        self.window = window
        self.min_context_tokens = min_context_tokens

    @classmethod
    def for_store(cls, store: BlockStore, tokenizer: str | Any, **kwargs: Any) -> QueryMaker:
        """A maker with defaults for the store's source: for a Wikipedia dump, entity-like
        anchors plus dates; otherwise the store's (pre-annotated) spans plus dates and
        capitalized phrases. Checks that the tokenizer is the store's."""
        tok = load_tokenizer(tokenizer)
        store.check_tokenizer(repr(tok.name), tok.vocab_hash)
        wiki = store.manifest.get("source", {}).get("format") == "wiki_xml"
        kwargs.setdefault("anchors", "entities" if wiki else "all")
        kwargs.setdefault("finder", DateFinder() if wiki else
                          CombinedFinder([DateFinder(), CapitalizedPhraseFinder()]))
        return cls(tok, **kwargs)

    def from_text(self, text: str, spans: Sequence[Span] = (), *, block_id: int = -1,
                  doc_index: int = -1, doc_id: str = "", seed: int = 0,
                  skipped: collections.Counter[str] | None = None) -> list[MaskedQuery]:
        """The queries of one text (at most one per sentence), in sentence order."""
        encoding = self.tokenizer.encode_batch([text])[0]
        return self._queries(text, encoding, spans, block_id, doc_index, doc_id, seed,
                             collections.Counter() if skipped is None else skipped)

    def from_block(self, store: BlockStore, block_id: int, *, seed: int = 0,
                   skipped: collections.Counter[str] | None = None) -> list[MaskedQuery]:
        """The queries of one block of a store."""
        return list(self.iter_store(store, [block_id], seed=seed, skipped=skipped))

    def iter_store(self, store: BlockStore, block_ids: Iterable[int] | None = None, *,
                   seed: int = 0, skipped: collections.Counter[str] | None = None,
                   batch_blocks: int = 64) -> Iterator[MaskedQuery]:
        """Queries of the given blocks (all by default), in order; tokenizes in batches."""
        skipped = collections.Counter() if skipped is None else skipped
        ids = iter(range(len(store)) if block_ids is None else block_ids)
        while batch := [store.record(int(i)) for i in itertools.islice(ids, batch_blocks)]:
            encodings = self.tokenizer.encode_batch([r.text for r in batch])
            for r, enc in zip(batch, encodings):
                yield from self._queries(r.text, enc, r.spans, r.block_id, r.doc_index,
                                         r.doc_id, seed, skipped)

    def require_queries(self, store: BlockStore, block_ids: Sequence[int] | None = None,
                        seed: int = 0, sample: int = 512) -> None:
        """Fail fast where an endless input pipeline would skip every block: raise ValueError
        when none of up to ``sample`` blocks (evenly spread over ``block_ids``, default all)
        gives a query. An empty selection fails too. A corpus whose queries are rarer than
        one block in ``sample`` is refused as well: training on it would hardly advance."""
        ids = np.arange(len(store)) if block_ids is None else np.asarray(block_ids, np.int64)
        picked = ids[np.unique(np.linspace(0, len(ids) - 1, min(sample, len(ids))).astype(
            np.int64))] if len(ids) else ids
        skipped: collections.Counter[str] = collections.Counter()
        if next(self.iter_store(store, picked.tolist(), seed=seed, skipped=skipped), None):
            return
        raise ValueError(
            f"no REALM query can be made from block store {store.path}: none of the "
            f"{len(picked)} block(s) looked at (of {len(ids)}) has a sentence with a usable "
            f"salient span (span finder: {describe_finder(self.finder)}; given spans: "
            f"{self.anchors}; sentences skipped: {dict(skipped) or 'none'}). Give the corpus "
            "salient spans: a Wikipedia dump (link anchors), JSONL records with \"spans\", or "
            "text with names and dates the finder recognises")

    # ------------------------------------------------------------------ internals

    def salient_spans(self, text: str, spans: Sequence[Span] = ()
                      ) -> tuple[list[tuple[int, int]], list[SalientSpan]]:
        """The text's sentences ``(start, end)`` and its salient spans (non-overlapping,
        sorted), as the queries see them."""
        found = self.finder(text) if self.finder is not None else []
        protected = [(s, e) for s, e, _ in spans] + [(s.start, s.end) for s in found]
        sentences = split_sentences(text, protected)
        anchors = anchor_spans(text, spans, sentences, self.anchors,
                               label="ANCHOR" if self.anchors == "entities" else "ANNOTATED")
        return sentences, resolve_overlaps(anchors + list(found))

    def _window(self, t0: int, t1: int, a: int, b: int, word_ids: np.ndarray
                ) -> tuple[int, int] | None:
        """Token range [w0, w1) of the query: the sentence [t0, t1), or a window of at most
        Q - 2 tokens holding the mask [a, b), centred on it and snapped to word boundaries."""
        room = self.query_length - 2
        if t1 - t0 <= room:
            return t0, t1
        if not self.window:
            return (t0, t0 + room) if b <= t0 + room else None
        left = min(max(a - (room - (b - a)) // 2, t0), t1 - room)
        while t0 < left < a and word_ids[left] == word_ids[left - 1]:
            left += 1
        right = min(left + room, t1)
        while b < right < t1 and word_ids[right] == word_ids[right - 1]:
            right -= 1
        return left, right

    def _queries(self, text: str, encoding: Any, spans: Sequence[Span], block_id: int,
                 doc_index: int, doc_id: str, seed: int,
                 skipped: collections.Counter[str]) -> list[MaskedQuery]:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        word_ids = np.asarray([-1 if w is None else w for w in encoding.word_ids], np.int64)
        sentences, salient = self.salient_spans(text, spans)
        out = []
        for index, (c0, c1) in enumerate(sentences):
            t0, t1 = np.searchsorted(offsets[:, 0], [c0, c1], side="left").tolist()
            inside = [s for s in salient if s.start >= c0 and s.end <= c1]
            if not inside:
                skipped["no_salient_span"] += 1
                continue
            eligible, reasons = [], set()
            for s in inside:
                hit = np.flatnonzero((offsets[t0:t1, 0] < s.end) & (offsets[t0:t1, 1] > s.start))
                if len(hit) == 0:
                    reasons.add("span_without_tokens")
                    continue
                a, b = t0 + int(hit[0]), t0 + int(hit[-1]) + 1
                if b - a > self.max_mask_tokens:
                    reasons.add("span_too_long")
                    continue
                window = self._window(t0, t1, a, b, word_ids)
                if window is None:
                    reasons.add("mask_cut_off")
                    continue
                if window[1] - window[0] - (b - a) < self.min_context_tokens:
                    reasons.add("too_little_context")
                    continue
                eligible.append((s, a, b, window))
            if not eligible:
                skipped[next(r for r in SKIP_REASONS if r in reasons)] += 1
                continue
            rng = np.random.default_rng([seed, block_id + 1, index])
            s, a, b, (w0, w1) = eligible[int(rng.integers(len(eligible)))]
            out.append(self._build(ids, w0, w1, a, b, block_id, doc_index, doc_id,
                                   text[c0:c1], SalientSpan(s.start - c0, s.end - c0, s.label)))
        return out

    def _build(self, ids: np.ndarray, w0: int, w1: int, a: int, b: int, block_id: int,
               doc_index: int, doc_id: str, sentence: str, span: SalientSpan) -> MaskedQuery:
        m, sp, k = self.max_mask_tokens, self.special, b - a
        input_ids, attention = row(ids[w0:w1], self.query_length, cls_id=sp.cls, sep_id=sp.sep,
                                   pad_id=sp.pad)   # the window fits: no wordpiece is cut
        positions = np.zeros(m, dtype=np.int32)
        targets = np.zeros(m, dtype=np.int32)
        positions[:k] = np.arange(k) + 1 + a - w0
        targets[:k] = ids[a:b]
        input_ids[positions[:k]] = sp.mask
        valid = np.arange(m) < k
        return MaskedQuery(input_ids, attention, positions, targets, valid, block_id, doc_index,
                           doc_id, sentence, span)


def describe_finder(finder: SpanFinder | None) -> str:
    """A finder's name for messages: its class, or the classes it combines."""
    if finder is None:
        return "none"
    if isinstance(finder, CombinedFinder):
        return "+".join(describe_finder(f) for f in finder.finders)
    model = getattr(finder, "model", None)
    return type(finder).__name__ + (f"({model})" if isinstance(model, str) else "")


# The fields of a batch of queries (`collate_queries`), and those of their retrieved
# candidates (`candidate_tokens` and the retriever's ids and validity).
QUERY_FIELDS = ("input_ids", "attention_mask", "mask_positions", "mask_targets", "mask_valid",
                "block_id", "doc_index")
CANDIDATE_FIELDS = ("cand_ids", "cand_valid", "cand_tokens", "cand_lengths")


def collate_queries(queries: Sequence[MaskedQuery]) -> dict[str, np.ndarray]:
    """Stacks queries into a batch: ``input_ids``, ``attention_mask`` int32 [B, Q];
    ``mask_positions``, ``mask_targets`` int32 [B, M]; ``mask_valid`` bool [B, M];
    ``block_id``, ``doc_index`` int64 [B]."""
    if not queries:
        raise ValueError("no queries to collate")
    arrays, ids = QUERY_FIELDS[:-2], QUERY_FIELDS[-2:]   # ids: block_id, doc_index
    return {**{f: np.stack([getattr(q, f) for q in queries]) for f in arrays},
            **{f: np.array([getattr(q, f) for q in queries], np.int64) for f in ids}}


def candidate_tokens(store: BlockStore, candidate_ids: np.ndarray, *, max_length: int = 288,
                     pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' block tokens, int32 [B, K, max_length] (padded with ``pad_id``) and
    their lengths int32 [B, K]; a negative id (the null document, or no candidate) gives an
    empty row."""
    ids = np.asarray(candidate_ids)
    flat = ids.reshape(-1)
    tokens = np.full((flat.size, max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(flat.size, dtype=np.int32)
    real = np.flatnonzero(flat >= 0)
    if len(real):
        tokens[real], lengths[real] = store.tokens_batch(flat[real], max_length=max_length,
                                                         pad_id=pad_id)
    return tokens.reshape(*ids.shape, max_length), lengths.reshape(ids.shape)
