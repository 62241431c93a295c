"""Hard negatives mined from the project's own index, for DPR training.

For each training question (its embedding from a query tower), the searcher (a snapshot's:
``Snapshot.numpy_searcher()`` / ``scann_searcher()``, or any `realm_jax.index.base.Searcher`
over the store's block ids) returns the ``depth`` best blocks; the first ``num_negatives`` of
them, best first, that

- hold no answer (the evaluation's rule, `realm_jax.evaluate.has_answer`, on the block's
  text, as DPR's BM25 negatives), and
- are not one of the question's positives (same ``passage_id`` as the block's document id,
  same ``block_id``, or the same title and text)

become the question's ``hard_negative_ctxs`` (title, text, ``passage_id`` = the block's
document id, ``block_id``). :func:`mine_bm25_negatives` makes the same choice from a BM25
ranking (the ``bm25s`` library) instead, as DPR's BM25 negatives. Pure on the host;
:func:`realm_jax.data.dpr.write_dpr` writes the result atomically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from realm_jax.data.dpr import DprRecord, Passage
from realm_jax.data.store import BlockStore
from realm_jax.evaluate import has_answer
from realm_jax.index.base import Searcher


@dataclasses.dataclass(frozen=True)
class MiningStats:
    """What a mining pass found: questions, those with fewer negatives than asked, and the
    retrieved blocks left out for holding an answer or being a positive."""

    questions: int
    short: int
    with_answer: int
    positives: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def is_positive(store: BlockStore, block_id: int, record: DprRecord) -> bool:
    """Whether block `block_id` is one of the record's positives: the same block id, its
    document id equal to a positive's passage_id, or the same title and text."""
    doc_id, title, text = None, None, None
    for p in record.positive_ctxs:
        if p.block_id is not None and p.block_id == block_id:
            return True
        if p.passage_id is not None:
            doc_id = store.doc_id(block_id) if doc_id is None else doc_id
            if p.passage_id == doc_id:
                return True
        text = store.text(block_id) if text is None else text
        if p.text.strip() == text.strip():
            title = store.title(block_id) if title is None else title
            if p.title.strip() == title.strip():
                return True
    return False


def negatives_from_ranking(records: Sequence[DprRecord], ranked_ids: np.ndarray,
                           store: BlockStore, *, num_negatives: int, regex: bool = False,
                           keep_existing: bool = False) -> tuple[list[DprRecord], MiningStats]:
    """The records with ``hard_negative_ctxs`` chosen from ``ranked_ids`` [len(records),
    depth] (block ids, best first; negative ids are empty slots): the first
    ``num_negatives`` without an answer that are not positives. With ``keep_existing`` they
    follow the record's own hard negatives, else they replace them."""
    ranked_ids = np.asarray(ranked_ids)
    if ranked_ids.ndim != 2 or len(ranked_ids) != len(records):
        raise ValueError(f"ranked_ids must be [{len(records)}, depth], got {ranked_ids.shape}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    out, short, with_answer, positives = [], 0, 0, 0
    for record, row in zip(records, ranked_ids.tolist()):
        mined: list[Passage] = []
        for block_id in row:
            if len(mined) == num_negatives:
                break
            if block_id < 0:
                continue
            if block_id >= len(store):
                raise ValueError(f"block id {block_id} is beyond the {len(store)} blocks of "
                                 f"{store.path}: the index is not over this store")
            if is_positive(store, block_id, record):
                positives += 1
                continue
            r = store.record(block_id)
            if has_answer(r.text, record.answers, regex=regex):
                with_answer += 1
                continue
            mined.append(Passage(r.title, r.text, r.doc_id, block_id))
        short += len(mined) < num_negatives
        own = record.hard_negative_ctxs if keep_existing else ()
        out.append(dataclasses.replace(record, hard_negative_ctxs=tuple(own) + tuple(mined)))
    return out, MiningStats(len(records), short, with_answer, positives)


def mine_hard_negatives(records: Sequence[DprRecord], question_embeddings: np.ndarray,
                        searcher: Searcher, store: BlockStore, *, num_negatives: int,
                        depth: int = 100, regex: bool = False, batch_size: int = 1024,
                        keep_existing: bool = False) -> tuple[list[DprRecord], MiningStats]:
    """Dense hard negatives: the records with mined ``hard_negative_ctxs`` (see the module
    docstring). ``question_embeddings``: [len(records), P], the query tower's embeddings of
    their questions; ``searcher``: over ``store``'s block ids; ``num_negatives`` kept per
    question (fewer when the top ``depth`` lacks them); ``regex``: answers are regular
    expressions (CuratedTrec); ``batch_size``: questions searched at once."""
    embeddings = np.asarray(question_embeddings, np.float32)
    if embeddings.shape != (len(records), searcher.dim):
        raise ValueError(f"question_embeddings must be [{len(records)}, {searcher.dim}] (one "
                         f"per record, the index's width), got {embeddings.shape}")
    if depth < num_negatives:
        raise ValueError(f"need num_negatives <= depth, got num_negatives={num_negatives}, "
                         f"depth={depth}")
    ranked = np.concatenate([searcher.search(embeddings[s:s + batch_size], depth)[1]
                             for s in range(0, len(records), batch_size)])
    return negatives_from_ranking(records, ranked, store, num_negatives=num_negatives,
                                  regex=regex, keep_existing=keep_existing)


def bm25_ranking(store: BlockStore, questions: Sequence[str], depth: int, *,
                 title: bool = True) -> np.ndarray:
    """Block ids [len(questions), depth] ranked by BM25 (the ``bm25s`` library, English
    stopwords, no stemming) over each block's ``title text`` (``text`` alone with
    ``title=False``); blocks sharing no term with the question are left out (-1)."""
    import bm25s

    texts = [(f"{store.title(i)} {store.text(i)}" if title else store.text(i))
             for i in range(len(store))]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                    show_progress=False)
    k = min(depth, len(store))
    ids, scores = retriever.retrieve(bm25s.tokenize(list(questions), stopwords="en",
                                                    show_progress=False),
                                     k=k, show_progress=False)
    ranked = np.where(scores > 0, ids, -1).astype(np.int64)
    return np.pad(ranked, ((0, 0), (0, depth - k)), constant_values=-1)


def mine_bm25_negatives(records: Sequence[DprRecord], store: BlockStore, *,
                        num_negatives: int, depth: int = 100, regex: bool = False,
                        title: bool = True, keep_existing: bool = False
                        ) -> tuple[list[DprRecord], MiningStats]:
    """BM25 hard negatives (DPR's kind): :func:`bm25_ranking` of the questions, then the
    choice of :func:`negatives_from_ranking`."""
    ranked = bm25_ranking(store, [r.question for r in records], depth, title=title)
    return negatives_from_ranking(records, ranked, store, num_negatives=num_negatives,
                                  regex=regex, keep_existing=keep_existing)
