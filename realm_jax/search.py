"""`realm-jax search`: questions answered by retrieval from a workdir's newest valid index
snapshot, with no reader: the corpus documents whose blocks score highest.

    realm-jax search --workdir W [--top_k K] [--json] QUESTION...   (or one per line on stdin)

The query tower is the one the snapshot was embedded for: the `query_tower` of the
checkpoint the snapshot came from (REALM, ORQA with a trained document tower); for a
snapshot of a frozen HF document tower, the query tower the run trains against it (ORQA's
`query_tower`, RAG's `question_encoder`) from the run's newest checkpoint; without
checkpoints, the config's query-side HF folder (`model.query_tower_hf`, RAG's
`model.question_encoder_hf`), else the snapshot's own document tower folder (a symmetric
retriever such as MiniLM). Blocks' texts are
read from the store version the snapshot was built from (`Workdir.snapshot_store`), so a
document removed before the snapshot was built is never shown.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np

from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.data.store import BlockStore
from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)
QUERY_TOWER = "query_tower"
QUESTION_ENCODER = "question_encoder"  # RAG's query tower: a part of the "rag" model
RAG_QUESTION_TOKENIZER = "question_encoder_tokenizer"  # its subfolder in a HF RAG folder


@dataclasses.dataclass(frozen=True)
class Hit:
    """One retrieved block: its corpus document id, title, text, score and block id."""

    id: str
    title: str
    text: str
    score: float
    block: int


def _config_value(config, *dotted: str) -> Any:
    """The first set value among the config fields `dotted` ("section.field"), or None."""
    for path in dotted:
        node = config
        for name in path.split("."):
            node = node.get(name) if hasattr(node, "get") else None
        if node:
            return node
    return None


def query_tower(layout: Workdir, config, snapshot) -> tuple[Any, Any, str, str]:
    """(EmbedderConfig, host params, tokenizer folder, what it is) of the query tower that
    goes with `snapshot` (see the module docstring)."""
    from realm_jax import hf

    extra = snapshot.manifest.get("extra", {})
    parts = layout.read_model() if layout.has_model() else {}
    trained = _trained_query_tower(parts)
    if trained is not None:
        part, tower, tokenizer_fields = trained
        checkpoints = TrainCheckpoints(layout, independent=True)
        from_checkpoint = extra.get("source") == "checkpoint"
        step = snapshot.step if from_checkpoint else checkpoints.latest_step()
        if step is not None:
            tokenizer = _config_value(config, *tokenizer_fields)
            if not tokenizer:
                raise ValueError(f"{layout.root}: config {' / '.join(tokenizer_fields)} is "
                                 "empty: the query tower's tokenizer folder is needed")
            sub = os.path.join(tokenizer, RAG_QUESTION_TOKENIZER)
            tokenizer = sub if os.path.isdir(sub) else tokenizer
            return (tower, checkpoints.restore_part(step, part), tokenizer,
                    f"checkpoint step {step}" + ("" if from_checkpoint else " (newest)"))
    folders = [(_config_value(config, f), f"config {f}")
               for f in ("model.query_tower_hf", "model.question_encoder_hf")]
    if extra.get("source") == "hf":
        folders.append((extra.get("source_path"), "the snapshot's document tower"))
    for folder, what in folders:
        if folder:
            return (*hf.load_embedder(folder), folder, f"{folder} ({what})")
    raise ValueError(f"{snapshot.path}: no query tower for this snapshot: its checkpoint has "
                     "no query_tower and the config names no model.query_tower_hf")


def _trained_query_tower(parts: dict) -> tuple[str, Any, tuple[str, ...]] | None:
    """(checkpoint part, EmbedderConfig, config fields naming its tokenizer) of the query
    tower a run's model (WORKDIR/model.json `parts`) trains, or None."""
    if QUERY_TOWER in parts:
        return QUERY_TOWER, parts[QUERY_TOWER], ("data.tokenizer",)
    for config in parts.values():
        tower = getattr(config, QUESTION_ENCODER, None)
        if tower is not None:
            return QUESTION_ENCODER, tower, ("data.question_tokenizer",
                                             "model.question_encoder_hf")
    return None


class Searcher:
    """The newest valid snapshot of WORKDIR/index, its query tower and its store version."""

    def __init__(self, workdir: str | os.PathLike, config=None, query_length: int | None = None):
        from realm_jax import hf
        from realm_jax.embedding import TextEmbedder

        self.layout = Workdir(workdir)
        config = config if config is not None else self.layout.read_config()
        corpus = _config_value(config, "data.corpus", "refresh.corpus")
        if not corpus:
            raise ValueError(f"{self.layout.root}: the config names no corpus (data.corpus)")
        store = BlockStore.open(corpus)
        self.snapshot = self.layout.wait_for_snapshot(self.layout.index_watcher(store), 0)
        self.store = self.layout.snapshot_store(self.snapshot, store)
        tower, params, tokenizer, what = query_tower(self.layout, config, self.snapshot)
        if tower.output_dim != self.snapshot.dim:
            raise ValueError(f"the query tower {what} makes {tower.output_dim}-d embeddings, "
                             f"snapshot {self.snapshot.path} holds {self.snapshot.dim}-d ones")
        length = (query_length or _config_value(config, "search.query_length",
                                                "retrieval.query_length") or 64)
        self.embedder = TextEmbedder(tower, params, hf.load_tokenizer(tokenizer),
                                     max_length=int(length))
        self.searcher = (self.snapshot.scann_searcher() if self.snapshot.scann_settings
                         else self.snapshot.numpy_searcher())
        _log.info("searching snapshot %s (store version %d) with the query tower of %s",
                  self.snapshot.path, self.store.version, what)

    def search(self, questions: Sequence[str], top_k: int = 5) -> list[list[Hit]]:
        """The `top_k` best blocks of each question."""
        queries = self.embedder.embed(list(questions))
        scores, ids = self.searcher.search(queries, min(int(top_k), self.snapshot.count))
        return [[self._hit(score, block) for score, block in zip(row_scores, row_ids) if block >= 0]
                for row_scores, row_ids in zip(np.asarray(scores).tolist(),
                                               np.asarray(ids).tolist())]

    def _hit(self, score: float, block: int) -> Hit:
        record = self.store.record(block)
        return Hit(record.doc_id, record.title, record.text, float(score), int(block))
