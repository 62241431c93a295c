"""Retriever pre-training and training: ICT (ORQA's Inverse Cloze Task) and DPR, two tasks
on one base, with the towers of REALM (parts `query_tower` and `doc_tower`).

    realm-jax train --config configs/ict.py:tiny --workdir W --config.data.corpus=STORE \
        --config.data.tokenizer=DIR
    realm-jax train --config configs/dpr.py:tiny --workdir W --config.data.train=train.json \
        --config.data.eval=dev.json --config.data.corpus=STORE --config.model.init_from_hf=DIR
    realm-jax eval --workdir W        # W/eval/metrics.json: recall@k
    realm-jax convert --workdir W --part query_tower --out DIR   # an HF folder

ICT: a sentence of a block is the query, the block (without that sentence with probability
`ict.remove_probability`) its positive context. DPR: a question with one positive and
`dpr.num_hard_negatives` hard negatives from DPR's JSON / JSONL. Both: the softmax
cross-entropy of each query's positive among all contexts of the global batch, logits
`train.loss_scale * q . d` (`realm_jax.objectives.retrieval`). With
`train.grad_cache_chunk_size > 0` the step takes its gradient chunk by chunk (the gradient
cache, `realm_jax.objectives.grad_cache`), so a large global batch fits a small memory.

Towers: `model.init_from_hf` (one HF folder, both towers, its pooling and normalisation as
`hf.load_embedder` reads them), else random ones of `model.encoder`'s sizes with
`model.pooling` and a `model.retriever_proj_size` projection (REALM's 128). With
`model.shared_towers` one tower, the `doc_tower` part, embeds both sides.

Evaluation (`realm-jax eval`): the corpus embedded by the run's document tower (the
refresher's CorpusEmbedder and RowBuilder, with `config.refresh`'s settings), searched
exactly with the query tower's embeddings of the eval questions (DPR: data.eval; ICT: the
held-out blocks' pseudo-queries, a hit being their own block).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar, Sequence

import jax
import ml_collections
import numpy as np

from realm_jax import config as config_lib
from realm_jax import hf, sharding
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.data.store import BlockStore
from realm_jax.durable import atomic_write_text
from realm_jax.models import EmbedderConfig, random_params
from realm_jax.objectives.grad_cache import grad_cache_value_and_grad
from realm_jax.objectives.retrieval import dpr_loss, ict_loss
from realm_jax.tasks import heldout
from realm_jax.tasks.base import Answer, Passage, Task, register
from realm_jax.tasks.common import (apply_model, in_padded_batches, jit_apply, open_corpus,
                                    tower_config)
from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)

PARTS = ("query_tower", "doc_tower")
# The step's batch: queries [B, Q], documents [B * (1 + h), L] (each query's positive first).
BATCH_FIELDS = ("query_ids", "query_mask", "doc_ids", "doc_mask", "doc_valid")
HIT_RULE = {
    "dpr": "a retrieved block is a positive passage (its block_id, passage_id = the block's "
           "document id, or the same title and text) or holds an answer (evaluate.has_answer)",
    "ict": "the block the pseudo-query sentence was taken from is retrieved",
}


# ---------------------------------------------------------------------------------------
# Towers

def tokenizer_folder(config: ml_collections.ConfigDict) -> str:
    """data.tokenizer, else model.init_from_hf."""
    folder = config.data.tokenizer or config.model.init_from_hf
    if not folder:
        raise ValueError("no tokenizer: set --config.data.tokenizer or "
                         "--config.model.init_from_hf (a Hugging Face folder)")
    return folder


def build_towers(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """({part: EmbedderConfig}, {part: host params}) from `config.model` (module docstring);
    one part, `doc_tower`, with `model.shared_towers`."""
    m = config.model
    if m.init_from_hf:
        tower = hf.load_embedder(m.init_from_hf, **config_lib.model_knobs(m.encoder))
        towers = {"query_tower": tower, "doc_tower": tower}
    else:
        cfg = tower_config(m)
        towers = {part: (cfg, random_params(cfg, config.seed + i))
                  for i, part in enumerate(PARTS)}
    if m.shared_towers:
        towers = {"doc_tower": towers["doc_tower"]}
    return {p: t[0] for p, t in towers.items()}, {p: t[1] for p, t in towers.items()}


def query_part(configs: dict) -> str:
    """The part that embeds queries: `query_tower`, or `doc_tower` for shared towers."""
    return "query_tower" if "query_tower" in configs else "doc_tower"


# ---------------------------------------------------------------------------------------
# The loss

@dataclasses.dataclass(frozen=True)
class TowerLoss:
    """The in-batch softmax loss of `kind` ("ict" or "dpr") on a batch of BATCH_FIELDS;
    `__call__` is the step's loss, `value_and_grad` its gradient cache (chunk_size rows
    embedded at a time; 0: none). Metrics: loss, accuracy (positive ranked first), mrr."""
    configs: dict
    kind: str
    scale: float = 1.0
    chunk_size: int = 0

    def embed(self, part: str, params, ids, mask, rng=None):
        return apply_model(self.configs[part], params[part], ids, mask, rng=rng)

    def on_embeddings(self, queries, docs, batch: dict):
        if self.kind == "ict":
            out = ict_loss(queries, docs, scale=self.scale)
        else:
            out = dpr_loss(queries, docs, scale=self.scale, passage_valid=batch["doc_valid"])
        return out.loss, {"loss": out.loss, "accuracy": out.accuracy, "mrr": out.mrr}

    def __call__(self, params, batch: dict, extras, rng):
        q_rng, d_rng = (None, None) if rng is None else jax.random.split(rng)
        queries = self.embed(query_part(self.configs), params, batch["query_ids"],
                             batch["query_mask"], q_rng)
        docs = self.embed("doc_tower", params, batch["doc_ids"], batch["doc_mask"], d_rng)
        return self.on_embeddings(queries, docs, batch)

    def value_and_grad(self, params, batch: dict, extras, rng):
        """((loss, metrics), grads) as `jax.value_and_grad(self, has_aux=True)`, by the
        gradient cache."""
        def embedder(part):
            return lambda p, rows, r=None: self.embed(part, p, rows[0], rows[1], r)

        return grad_cache_value_and_grad(
            embedder(query_part(self.configs)), embedder("doc_tower"),
            lambda q, d: self.on_embeddings(q, d, batch), params,
            (batch["query_ids"], batch["query_mask"]), (batch["doc_ids"], batch["doc_mask"]),
            self.chunk_size, has_aux=True, rng=rng)


# ---------------------------------------------------------------------------------------
# The tasks

class RetrieverTask(Task):
    """What ICT and DPR share: the towers, the loss (plain or gradient-cached), the step's
    batch from the host items (`rows(item)` -> BATCH_FIELDS on the host) and the
    answerer. A subclass gives `dataset` and `rows`."""

    kind: ClassVar[str]
    progress_keys = ("loss", "accuracy", "step_time")

    def build(self) -> tuple[dict, dict]:
        configs, params = build_towers(self.config)
        tc = self.config.train
        self.loss_fn = TowerLoss(configs, self.kind, float(tc.loss_scale),
                                 int(tc.grad_cache_chunk_size))
        if self.loss_fn.chunk_size > 0:
            self.value_and_grad = self.loss_fn.value_and_grad
        return configs, params

    def load(self, item):
        return self.rows(item)

    def start(self, run) -> None:
        self.run = run

    def make_batch(self, item, params):
        return sharding.global_batch(item, self.run.batch_sharding), None

    def loss(self, params, batch, extras, rng):
        return self.loss_fn(params, batch, extras, rng)

    @classmethod
    def answerer(cls, config, workdir, step=None) -> "RetrieverAnswerer":
        return RetrieverAnswerer(config, workdir, step=step)


@register
class IctTask(RetrieverTask):
    """ICT (ORQA): pseudo-queries from the training blocks of data.corpus (the held-out
    documents, `data.heldout_fraction`, are kept for evaluation)."""

    name = kind = "ict"

    def dataset(self, run):
        from realm_jax.data.ict import ict_dataset

        self.maker = ict_maker(self.config)
        train, _ = heldout.split_blocks(self.maker.store, self.config.data.heldout_fraction)
        return ict_dataset(self.maker, self.config.train.batch_size, self.config.seed,
                           block_ids=train, process_index=jax.process_index(),
                           process_count=jax.process_count())

    def rows(self, batch: dict) -> dict:
        return dict(query_ids=batch["query_input_ids"], query_mask=batch["query_attention_mask"],
                    doc_ids=batch["context_input_ids"], doc_mask=batch["context_attention_mask"],
                    doc_valid=np.ones(len(batch["context_input_ids"]), bool))


@register
class DprTask(RetrieverTask):
    """DPR: questions of data.train (DPR JSON / JSONL), each with its positive and
    `dpr.num_hard_negatives` negatives."""

    name = kind = "dpr"

    def dataset(self, run):
        from realm_jax.data.dpr import dpr_dataset, read_dpr

        if not self.config.data.train:
            raise ValueError("set --config.data.train (DPR training data: .json or .jsonl)")
        records = read_dpr(self.config.data.train)
        return dpr_dataset(records, dpr_maker(self.config), self.config.train.batch_size,
                           self.config.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())

    def rows(self, batch: dict) -> dict:
        # An empty slot (no negative left) gets its first token unmasked: the loss leaves it
        # out, but an all-masked row's gradient is NaN in normalised or mean-pooled towers.
        mask = batch["passage_attention_mask"].copy()
        mask[:, 0] |= ~batch["passage_valid"]
        return dict(query_ids=batch["question_input_ids"],
                    query_mask=batch["question_attention_mask"],
                    doc_ids=batch["passage_input_ids"], doc_mask=mask,
                    doc_valid=batch["passage_valid"])


def ict_maker(config: ml_collections.ConfigDict, store: BlockStore | None = None):
    from realm_jax.data.ict import IctExampleMaker

    ic = config.ict
    return IctExampleMaker(store or open_corpus(config), tokenizer_folder(config),
                           query_length=ic.query_length, context_length=ic.context_length,
                           remove_probability=ic.remove_probability)


def dpr_maker(config: ml_collections.ConfigDict):
    from realm_jax.data.dpr import DprExampleMaker

    dc = config.dpr
    return DprExampleMaker(tokenizer_folder(config), num_hard_negatives=dc.num_hard_negatives,
                           question_length=dc.question_length,
                           passage_length=dc.passage_length, title=dc.title)


# ---------------------------------------------------------------------------------------
# Evaluation, answering, mining

def load_towers(workdir: str | Path, step: int | None = None) -> tuple[dict, dict, int]:
    """({part: EmbedderConfig}, {part: host params}, step) of a retriever run's checkpoint
    (`step`, default the newest)."""
    checkpoints = TrainCheckpoints(workdir)
    configs = checkpoints.model_configs("doc_tower")
    step = checkpoints.step_or_latest(step)
    configs = {p: configs[p] for p in PARTS if p in configs}
    return configs, {p: checkpoints.restore_part(step, p) for p in configs}, step


def embed_corpus(config: ml_collections.ConfigDict, store: BlockStore, cfg: EmbedderConfig,
                 params) -> np.ndarray:
    """[len(store), P] float32: every block embedded as the refresher embeds it
    (CorpusEmbedder, RowBuilder and config.refresh's title, length, batch size, dtype)."""
    from realm_jax.index.embed_corpus import TITLE_CHOICES, CorpusEmbedder, RowBuilder

    rc = config.refresh
    embedder = CorpusEmbedder(cfg, batch_size=rc.batch_size, dtype=rc.dtype)
    rows = RowBuilder.for_store(store, tokenizer_folder(config),
                                title=TITLE_CHOICES[rc.title],
                                max_length=rc.max_length or embedder.max_length)
    out = embedder.embed_blocks(embedder.place(params), rows, np.arange(len(store)))
    return np.asarray(out, np.float32)


def recall_figures(hit_ranks: Sequence[int], ks: Sequence[int]) -> dict:
    """{"recall@k": fraction of questions with a hit in the top k} (rank 0-based, -1: none)."""
    ranks = np.asarray(hit_ranks, np.int64)
    return {f"recall@{k}": float(np.mean((ranks >= 0) & (ranks < k))) if len(ranks) else 0.0
            for k in ks}


class RetrieverAnswerer:
    """A retriever run's towers over its corpus: the corpus embedded by the checkpoint's
    document tower (`embed_corpus`), queries by its query tower, exact search."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, *,
                 step: int | None = None):
        self.config, self.workdir = config, Workdir(workdir)
        self.configs, self.params, self.step = load_towers(workdir, step)
        self.store = open_corpus(config)
        self.kind = config.task
        from realm_jax.index.base import NumpySearcher

        doc = "doc_tower"
        self.searcher = NumpySearcher(embed_corpus(config, self.store, self.configs[doc],
                                                   self.params[doc]))

    def embed_rows(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Query embeddings [n, P] of rows (the query tower, jitted, in eval.batch_size)."""
        if not len(ids):
            return np.zeros((0, self.searcher.dim), np.float32)
        part = query_part(self.configs)

        def embed(rows: list[int]) -> list[np.ndarray]:
            return list(np.asarray(jit_apply(self.configs[part], self.params[part], ids[rows],
                                             mask[rows])))

        return np.stack(in_padded_batches(range(len(ids)), self.config.eval.batch_size, embed))

    def embed_questions(self, questions: Sequence[str]) -> np.ndarray:
        """Query embeddings [n, P] of `[CLS] question [SEP]` rows (dpr.question_length or
        ict.query_length wordpieces)."""
        from realm_jax.data.dpr import DprExampleMaker

        length = (self.config.ict.query_length if self.kind == "ict"
                  else self.config.dpr.question_length)
        maker = DprExampleMaker(tokenizer_folder(self.config), question_length=length)
        rows = maker.question_rows(list(questions))
        return self.embed_rows(rows["input_ids"], rows["attention_mask"])

    def answer(self, questions: Sequence[str], k: int = 5) -> list[Answer]:
        """The top k blocks of each question (no answer is read: the answer is "")."""
        scores, ids = self.searcher.search(self.embed_questions(questions), k)
        return [Answer(q, "", 0.0, tuple(
            Passage(int(i), self.store.title(int(i)), self.store.text(int(i)), float(s))
            for i, s in zip(ids[n], scores[n]) if i >= 0)) for n, q in enumerate(questions)]

    def _dpr_hits(self, depth: int) -> tuple[list[dict], dict]:
        from realm_jax.data.dpr import read_dpr
        from realm_jax.evaluate import has_answer
        from realm_jax.index.mining import is_positive

        if not self.config.data.eval:
            raise ValueError("set --config.data.eval (DPR evaluation data: .json or .jsonl)")
        records = read_dpr(self.config.data.eval)
        if self.config.eval.num_questions:
            records = records[:self.config.eval.num_questions]
        _, found = self.searcher.search(self.embed_questions([r.question for r in records]),
                                        depth)
        rows, by_positive = [], 0
        for record, ids in zip(records, found.tolist()):
            rank, positive = -1, False
            for r, block in enumerate(i for i in ids if i >= 0):
                positive = is_positive(self.store, block, record)
                if positive or has_answer(self.store.text(block), record.answers):
                    rank = r
                    break
            by_positive += positive
            rows.append({"question": record.question, "answers": list(record.answers),
                         "retrieved": [i for i in ids if i >= 0][:10], "hit_rank": rank,
                         "hit_by_positive": positive})
        return rows, {"hits_by_positive_passage": by_positive}

    def _ict_hits(self, depth: int) -> tuple[list[dict], dict]:
        maker = ict_maker(self.config, self.store)
        _, held = heldout.split_blocks(self.store, self.config.data.heldout_fraction)
        rng = np.random.default_rng(self.config.seed)
        examples = [e for e in (maker.example(int(b), rng) for b in held) if e is not None]
        if self.config.eval.num_questions:
            examples = examples[:self.config.eval.num_questions]
        if not examples:
            raise ValueError(f"ICT evaluation: no held-out block of {self.store.path} has two "
                             "sentences (raise data.heldout_fraction)")
        q = self.embed_rows(np.stack([e.query_input_ids for e in examples]),
                            np.stack([e.query_attention_mask for e in examples]))
        _, found = self.searcher.search(q, depth)
        rows = []
        for e, ids in zip(examples, found.tolist()):
            ids = [i for i in ids if i >= 0]
            rows.append({"block_id": e.block_id, "sentence": e.sentence, "retrieved": ids[:10],
                         "hit_rank": ids.index(e.block_id) if e.block_id in ids else -1})
        return rows, {}

    def evaluate(self, out: str | None = None) -> tuple[dict, str]:
        """recall@k (`eval.recall_at`) on the eval questions: W/eval/metrics.json, and the
        per-question ranks as JSONL (`out`, default W/eval/predictions.jsonl)."""
        ks = tuple(int(k) for k in self.config.eval.recall_at)
        depth = min(max(ks), self.searcher.size)
        rows, extra = (self._ict_hits if self.kind == "ict" else self._dpr_hits)(depth)
        metrics = dict(recall_figures([r["hit_rank"] for r in rows], ks), count=len(rows),
                       step=self.step, task=self.kind, corpus_blocks=self.searcher.size,
                       hit=HIT_RULE[self.kind], **extra)
        eval_dir = Path(self.workdir.eval_dir)
        atomic_write_text(eval_dir / "metrics.json",
                          json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        path = Path(out) if out else eval_dir / "predictions.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return metrics, str(path)
