"""ORQA / REALM open-QA fine-tuning: the model, the task and the predictor.

Two trained parts, each a pure linen module with its own params: `query_tower` (Embedder)
and `reader` (SpanReader: BERT encoder + span head). The document index is frozen: the
embeddings of an IndexStore snapshot (from REALM pre-training, or built from pretrained
weights with `realm-jax refresh --once --from_hf`), sharded along the corpus axis on the
devices with the blocks' tokens.

End to end (`model.train_doc_tower`, `retrieval.strategy` "refresh" or "rerank"): a third
part, `doc_tower`, initialised from the tower that built the index, is trained too: the
beam's blocks are re-embedded by it inside the step (as REALM's candidates are), so the
retrieval loss reaches both towers. The strategies, the drift hook and their checks are
shared with RAG and described in tasks/end_to_end.py.

One training step:

1. host: a batch of questions (a seeded, checkpointed pipeline over the QA examples),
   tokenized `[CLS] question [SEP]`;
2. devices (jitted, sharded): the live query tower embeds them and the exact search over the
   frozen embeddings returns the retriever beam (`retrieval.beam_size` blocks, 5000 in ORQA);
3. host: answer matching on the blocks' texts (`data.answers.AnswerMatcher`): which beam
   blocks contain an answer, which spans of the first `retrieval.num_read` (5) match one;
4. devices (the jitted, sharded train step): the beam's retrieval logits recomputed by the
   live query tower against the frozen embeddings of the beam (so the query tower gets
   gradients), the span reader over `[CLS] question [SEP] block [SEP]` of the first k
   blocks, the ORQA loss (`objectives.orqa`), the update.

Steps 2 and 4 see the same parameters, so the beam is exactly what a search inside the step
would return; the search is its own jitted call because the answer matching (3) needs the
blocks' texts on the host, between the two.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from realm_jax import config as config_lib
from realm_jax import hf, sharding
from realm_jax.data.answers import AnswerMatcher
from realm_jax.data.blocks import load_tokenizer
from realm_jax.data.qa import QAExample, load_qa, questions_from_store
from realm_jax.data.realm_examples import SpecialIds, special_ids
from realm_jax.data.store import BlockStore
from realm_jax.index.device import device_topk
from realm_jax.models import EncoderConfig, SpanReaderConfig, random_params
from realm_jax.objectives.orqa import (best_span, evidence_mask, joint_span_logits, orqa_loss,
                                       span_labels, span_valid_mask)
from realm_jax.objectives.realm import reader_inputs
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.tasks import realm
from realm_jax.tasks.base import Answer, Hook, Passage, Task, register
from realm_jax.tasks.common import (QATask, apply_model, evaluate_answers, in_padded_batches,
                                    tower_config)
from realm_jax.tasks.end_to_end import (DOC_TOWER, DriftProbe, Strategy, embed_docs, live_top,
                                        question_batch)
from realm_jax.tasks import end_to_end
from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)

PARTS = ("query_tower", "reader")
STEP_FIELDS = ("input_ids", "attention_mask", "beam_ids", "retrieval_correct", "span_correct")
EVAL_PREFIX = "eval_"


# ---------------------------------------------------------------------------------------
# Models

def _reader_encoder(cfg, params, where: str) -> tuple[EncoderConfig, dict]:
    """The BERT encoder of any model that has one (a REALM reader or knowledge-augmented
    encoder, a tower, a BERT folder)."""
    if isinstance(cfg, EncoderConfig):
        return cfg, params
    if hasattr(cfg, "encoder") and "encoder" in params:
        return cfg.encoder, params["encoder"]
    raise ValueError(f"{where}: a {type(cfg).__name__} has no BERT encoder for the reader")


def _realm_run(m: ml_collections.ConfigDict, *required: str
               ) -> tuple[TrainCheckpoints, int, dict]:
    """(checkpoints, step `model.realm_step` (-1: the newest), parts' model configs, the
    `required` ones checked) of the `model.init_from_realm` workdir."""
    ckpts = TrainCheckpoints(m.init_from_realm)
    hint = f" (model.init_from_realm={m.init_from_realm})"
    step = ckpts.step_or_latest(None if m.realm_step < 0 else m.realm_step, hint)
    return ckpts, step, ckpts.model_configs(*required, hint=hint)


def build_models(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(configs, host params) of the two parts, from `config.model`, in this order (a later
    source replaces what an earlier one gave):

    - `init_from_realm`: a REALM pre-training workdir: its query tower, and its reader's
      encoder under a new span head (checkpoint `realm_step`; -1: the newest); or an ICT /
      DPR workdir (no reader): its query tower (the doc_tower of shared towers), the
      reader as the next source gives it;
    - `init_from_hf`: one BERT-layout folder for both (the reader's span head new);
    - otherwise random weights of the sizes in `model.encoder`;
    - `query_tower_hf`: a retriever tower folder (REALM embedder, DPR question encoder, BERT);
    - `reader_hf`: a REALM reader folder (span head included) or any folder with a BERT
      encoder (span head new);
    - with `train_doc_tower`, a `doc_tower` part: the REALM workdir's doc_tower, else
      `refresh.doc_tower_hf`, else `init_from_hf` (the tower the index was built with).
    The span head's sizes: `model.span_hidden_size`, `model.max_span_width`."""
    m = config.model
    knobs = config_lib.model_knobs(m.encoder)
    realm_query = encoder = None
    if m.init_from_realm:
        ckpts, step, saved = _realm_run(m)
        tower = "query_tower" if "query_tower" in saved else "doc_tower"
        if tower not in saved:
            raise ValueError(f"model.init_from_realm={m.init_from_realm}: no query_tower or "
                             f"doc_tower in its model.json (parts: {sorted(saved)})")
        realm_query = saved[tower], ckpts.restore_part(step, tower)
        if "reader" in saved:
            encoder = _reader_encoder(saved["reader"], ckpts.restore_part(step, "reader"),
                                      f"model.init_from_realm={m.init_from_realm}")
    if m.init_from_hf:
        query = hf.load_embedder(m.init_from_hf, **knobs)
        encoder = encoder or (query[0].encoder, query[1]["encoder"])
    else:
        tower = tower_config(m)
        query = realm_query or (tower, random_params(tower, config.seed))
        encoder = encoder or (tower.encoder, None)
    query = realm_query or query
    if m.query_tower_hf:
        query = hf.load_embedder(m.query_tower_hf, **knobs)
    reader = None
    if m.reader_hf:
        cfg, params = hf.load(m.reader_hf, **knobs)
        if isinstance(cfg, SpanReaderConfig):
            reader = dataclasses.replace(cfg, max_span_width=m.max_span_width), params
        else:
            encoder = _reader_encoder(cfg, params, f"model.reader_hf={m.reader_hf}")
    if reader is None:
        cfg = SpanReaderConfig(encoder[0].replace(add_pooler=False),
                               span_hidden_size=m.span_hidden_size,
                               max_span_width=m.max_span_width)
        params = random_params(cfg, config.seed + 1)
        if encoder[1] is not None:
            params["encoder"] = {k: v for k, v in encoder[1].items() if k != "pooler"}
        reader = cfg, params
    configs = {"query_tower": query[0], "reader": reader[0]}
    params = {"query_tower": query[1], "reader": reader[1]}
    if config.model.train_doc_tower:
        configs[DOC_TOWER], params[DOC_TOWER] = _doc_tower(config, knobs)
    return configs, params


def _doc_tower(config: ml_collections.ConfigDict, knobs: dict) -> tuple:
    """(EmbedderConfig, host params) of the document tower that built the index."""
    m = config.model
    if m.init_from_realm:
        ckpts, step, saved = _realm_run(m, DOC_TOWER)
        return saved[DOC_TOWER], ckpts.restore_part(step, DOC_TOWER)
    folder = config.refresh.doc_tower_hf or m.init_from_hf
    if not folder:
        raise ValueError("model.train_doc_tower: no document tower to start from: set "
                         "model.init_from_realm, refresh.doc_tower_hf or model.init_from_hf "
                         "(the tower the index was built with)")
    return hf.load_embedder(folder, **knobs)


@dataclasses.dataclass(frozen=True)
class OrqaModel:
    """The ORQA computation on device arrays (pure methods, for jit). `corpus`: the
    DeviceCorpus arrays (frozen embeddings, block tokens and lengths, corpus-sharded).
    Batches hold `input_ids`, `attention_mask` [B, Q] (`[CLS] question [SEP]`); training
    batches also `beam_ids` [B, R] (-1: empty), `retrieval_correct` [B, R] and
    `span_correct` [B, k, S]."""

    configs: dict
    special: SpecialIds
    beam_size: int
    num_read: int
    score_scale: float
    num_valid: int
    block_size: int = 4096
    reader_length: int | None = None   # T of `[CLS] question [SEP] block [SEP]` (None: Q + C)
    strategy: str = "query_side"       # retrieval.strategy (end_to_end.STRATEGIES)
    over_retrieve: int = 0             # rerank: blocks proposed by the stale index

    @property
    def how(self) -> Strategy:
        return Strategy(self.strategy, self.over_retrieve)

    def embed(self, params, batch: dict, rng=None) -> jax.Array:
        """[B, P] the live query tower's question embeddings."""
        return apply_model(self.configs["query_tower"], params["query_tower"],
                           batch["input_ids"], batch["attention_mask"], rng=rng)

    def top_rows(self, questions: jax.Array, corpus: dict, depth: int) -> jax.Array:
        """Rows [B, depth] of the best-scoring blocks for question embeddings, best first
        (the exact search of the corpus-sharded frozen embeddings; no gradient)."""
        _, rows = device_topk(jax.lax.stop_gradient(questions), corpus["embeddings"],
                              min(depth, self.num_valid), block_size=self.block_size,
                              num_valid=self.num_valid,
                              row_valid=realm.corpus_row_valid(corpus))
        return rows

    def embed_rows(self, params, corpus: dict, rows: jax.Array, rng=None) -> jax.Array:
        """[B, R, P] the blocks `rows` [B, R] embedded by the live document tower (empty
        slots embed an empty block)."""
        ids, mask = realm.doc_tower_inputs(*realm.gather_blocks(corpus, rows), self.special)
        return embed_docs(self.configs[DOC_TOWER], params[DOC_TOWER], ids, mask, rng)

    def retrieve(self, params, questions: jax.Array, corpus: dict, depth: int) -> jax.Array:
        """Rows [B, depth] of the blocks retrieved for question embeddings: the index's best
        ("query_side", "refresh"), or ("rerank") the best by live score of the index's
        `over_retrieve` (no gradient)."""
        pool = self.top_rows(questions, corpus, self.how.pool_depth(depth))
        return self.how.choose(pool, lambda rows: self.embed_rows(params, corpus, rows),
                               questions, depth)

    def search(self, params, batch: dict, corpus: dict) -> jax.Array:
        """The retriever beam: rows [B, beam_size]."""
        return self.retrieve(params, self.embed(params, batch), corpus, self.beam_size)

    def drift_rows(self, params, batch: dict, corpus: dict) -> tuple[jax.Array, jax.Array]:
        """(the served index's top `num_read` rows, the live towers' exact top `num_read`
        over the index's best max(over_retrieve, beam_size) blocks, freshly embedded)."""
        questions = self.embed(params, batch)
        served = self.top_rows(questions, corpus, self.num_read)
        pool = self.top_rows(questions, corpus, self.how.probe_depth(self.beam_size))
        return served, live_top(pool, self.embed_rows(params, corpus, pool), questions,
                                self.num_read).ids

    def retrieval_logits(self, params, questions: jax.Array, corpus: dict, rows: jax.Array,
                         rng=None) -> jax.Array:
        """[B, R] question embeddings . the embeddings of `rows` (scaled): the live
        document tower's (`how.live_docs`), else the index's."""
        if self.how.live_docs:
            docs = self.embed_rows(params, corpus, rows, rng).astype(jnp.float32)
        else:
            docs = jnp.take(corpus["embeddings"], jnp.maximum(rows, 0),
                            axis=0).astype(jnp.float32)
        return jnp.einsum("bp,brp->br", questions, docs) * self.score_scale

    def read(self, params, batch: dict, corpus: dict, rows: jax.Array, rng=None):
        """The reader over `[CLS] question [SEP] block [SEP]` of `rows` [B, k]: span logits
        [B, k, S], the spans' starts and ends [S] (reader positions) and their validity
        [B, k, S] (inside the block's tokens; empty slots have none)."""
        r = reader_inputs(batch["input_ids"], batch["attention_mask"],
                          *realm.gather_blocks(corpus, rows), sep_id=self.special.sep,
                          pad_id=self.special.pad, length=self.reader_length)
        b, k, t = r.input_ids.shape
        evidence = evidence_mask(r.token_type_ids)
        logits, starts, ends = apply_model(
            self.configs["reader"], params["reader"], *(x.reshape(b * k, t) for x in (
                r.input_ids, r.attention_mask, r.token_type_ids, evidence)), rng=rng)
        return logits.reshape(b, k, -1), starts, ends, span_valid_mask(evidence, starts, ends)

    def loss(self, params, batch: dict, corpus: dict, rng: jax.Array | None):
        """(loss, metrics); dropout on when `rng` is given."""
        rng_q = rng_r = rng_d = None
        if rng is not None and self.how.live_docs:
            rng_q, rng_r, rng_d = jax.random.split(rng, 3)
        elif rng is not None:
            rng_q, rng_r = jax.random.split(rng)
        rows = batch["beam_ids"]
        logits = self.retrieval_logits(params, self.embed(params, batch, rng_q), corpus, rows,
                                       rng_d)
        span_logits, _, _, span_valid = self.read(params, batch, corpus,
                                                  rows[:, :self.num_read], rng_r)
        out = orqa_loss(logits, batch["retrieval_correct"], span_logits, batch["span_correct"],
                        beam_valid=rows >= 0, span_valid=span_valid)
        metrics = {"loss": out.loss, "retrieval_loss": out.retrieval_loss,
                   "reader_loss": out.reader_loss, "retrieval_dropped": out.retrieval_dropped,
                   "reader_dropped": out.reader_dropped,
                   "read_recall": batch["retrieval_correct"][:, :self.num_read].any(-1).mean()}
        return out.loss, metrics

    def predict(self, params, batch: dict, corpus: dict) -> dict:
        """The top k blocks (`rows` [B, k], retrieval `scores` [B, k]) and the best span over
        all of them by the joint logits (`candidate`, reader positions `start`, `end`,
        `score`, each [B])."""
        questions = self.embed(params, batch)
        rows = self.retrieve(params, questions, corpus, self.num_read)
        scores = self.retrieval_logits(params, questions, corpus, rows)
        span_logits, starts, ends, valid = self.read(params, batch, corpus, rows)
        best = best_span(joint_span_logits(span_logits, scores), starts, ends,
                         valid & (rows >= 0)[..., None])
        return {"rows": rows, "scores": scores, **best._asdict()}


# ---------------------------------------------------------------------------------------
# Host side: questions, answer targets

def encode_questions(tokenizer, special: SpecialIds, questions: Sequence[str], length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] question [SEP]` ids and attention masks [N, length] (questions cut to fit)."""
    ids = np.full((len(questions), length), special.pad, np.int32)
    mask = np.zeros((len(questions), length), np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(questions))):
        body = enc.ids[:length - 2]
        ids[i, :len(body) + 2] = [special.cls, *body, special.sep]
        mask[i, :len(body) + 2] = 1
    return ids, mask


def answer_targets(setup: "Setup", examples: Sequence[QAExample], batch: dict,
                   rows: np.ndarray) -> dict:
    """The answer targets of a batch, on the host: `retrieval_correct` [B, R] (the block
    contains an answer) and `span_correct` [B, k, S] (the span of a read block matches one,
    placed as the model's reader lays the block out)."""
    model, matcher, c = setup.model, setup.matcher, setup.config.retrieval.block_length
    b, k = len(examples), model.num_read
    width = model.configs["reader"].max_span_width
    read = rows[:, :k]
    lengths = np.where(read >= 0, np.minimum(matcher.store.lengths[np.maximum(read, 0)], c),
                       0).astype(np.int32)
    layout = reader_inputs(batch["input_ids"], batch["attention_mask"],
                           np.zeros((b, k, c), np.int32), lengths, sep_id=model.special.sep,
                           pad_id=model.special.pad, length=model.reader_length)
    evidence = evidence_mask(layout.token_type_ids)            # [B, k, T]
    t = evidence.shape[-1]
    retrieval = np.zeros(rows.shape, bool)
    spans = []
    for i, ex in enumerate(examples):
        retrieval[i] = matcher.contains(rows[i], ex.answers, regex=ex.is_regex)
        for j in range(k):
            where = np.flatnonzero(evidence[i, j])
            found = matcher.spans(int(read[i, j]), ex.answers, width, regex=ex.is_regex)
            spans.append(span_labels(found, int(where[0]) if len(where) else 0, len(where), t,
                                     width))
    return {"retrieval_correct": retrieval, "span_correct": np.stack(spans).reshape(b, k, -1)}


def qa_examples(config: ml_collections.ConfigDict, store: BlockStore, which: str,
                tokenizer=None) -> list[QAExample]:
    """The QA examples of `which` ("train" or "eval"): `data.<which>` is a QA file or a TFDS
    dataset (`load_qa`, split `data.<which>_split`, `data.data_dir`), or "cloze" for
    `data.cloze_questions` cloze questions made from the store (seeded by the config seed
    and the split's name: the same split gives the same questions)."""
    d = config.data
    spec, split = d[which], d[f"{which}_split"]
    if spec == "cloze":
        seed = config.seed + zlib.crc32(split.encode())
        return questions_from_store(store, tokenizer or d.tokenizer, num=d.cloze_questions,
                                    seed=seed)
    if not spec:
        raise ValueError(f"set --config.data.{which} (a QA file, tfds:natural_questions_open, "
                         "... or 'cloze')")
    examples = load_qa(spec, split=split, data_dir=d.data_dir or None)
    if not examples:
        raise ValueError(f"data.{which}={spec} (split {split!r}) holds no questions")
    return examples


def check_config(config: ml_collections.ConfigDict) -> None:
    rc, d = config.retrieval, config.data
    if not d.corpus or not d.tokenizer:
        raise ValueError("set --config.data.corpus (a block store from `realm-jax "
                         "prepare-corpus`) and --config.data.tokenizer (its HF tokenizer folder)")
    if rc.mode != "device":
        raise ValueError(f"retrieval.mode={rc.mode!r}: ORQA fine-tuning searches on the "
                         "devices only ('device')")
    if not 1 <= rc.num_read <= rc.beam_size:
        raise ValueError(f"need 1 <= retrieval.num_read ({rc.num_read}) <= "
                         f"retrieval.beam_size ({rc.beam_size})")
    end_to_end.check_config(config, rc.beam_size, "retrieval.beam_size")
    if rc.strategy == "refresh" and rc.index:
        raise ValueError(f"retrieval.strategy='refresh' serves WORKDIR/index, where the "
                         f"refresher publishes; retrieval.index={rc.index!r} must be ''")
    if rc.retriever_loss != "marginal":
        raise ValueError(f"retrieval.retriever_loss={rc.retriever_loss!r}: ORQA's retrieval "
                         "term is the marginal over the beam's correct blocks ('marginal'); "
                         "the distillation losses are RAG's")


# ---------------------------------------------------------------------------------------
# What the trainer and `realm-jax eval` / `answer` share

def _device_corpus(config: ml_collections.ConfigDict, snapshot, store: BlockStore, mesh, rules
                   ) -> tuple[BlockStore, realm.DeviceCorpus]:
    """(the version of `store` that `snapshot` was built from, the two on the devices)."""
    rc = config.retrieval
    store = Workdir.snapshot_store(snapshot, store)
    with sharding.activate(mesh, rules):
        return store, realm.device_corpus(snapshot, store, rc.block_length, mesh,
                                          rc.search_block_size)


@dataclasses.dataclass
class Setup:
    """The mesh, the corpus and its tokenizer, the frozen index on the devices, the model."""

    config: ml_collections.ConfigDict
    workdir: Workdir
    mesh: Any
    rules: Any
    store: BlockStore
    tokenizer: Any
    watcher: Any
    snapshot: Any
    corpus: realm.DeviceCorpus
    model: OrqaModel
    matcher: AnswerMatcher

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, workdir: str | Path, configs: dict
               ) -> "Setup":
        check_config(config)
        rc = config.retrieval
        mesh = sharding.mesh_from_config(config)
        rules = sharding.rules_from_config(config)
        store = BlockStore.open(config.data.corpus)
        tokenizer = load_tokenizer(config.data.tokenizer)
        # the newest snapshot under retrieval.index (default WORKDIR/index)
        run = Workdir(workdir)
        watcher = run.index_watcher(store, rc.index or None)
        wait = config.train.index_wait_seconds if rc.strategy == "refresh" else 0.0
        try:
            snapshot = run.wait_for_snapshot(watcher, wait)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"retrieval.index: no index snapshot of corpus {store.path} in "
                f"{watcher.store.root}: point --config.retrieval.index at a REALM pre-training "
                "run's WORKDIR/index, or build one from pretrained weights: realm-jax refresh "
                f"--config ... --workdir {run.root} --once --from_hf DOC_TOWER_DIR") from None
        store, corpus = _device_corpus(config, snapshot, store, mesh, rules)
        # every row of the device corpus is searched: padding and removed blocks are masked
        # by their doc_index, so the compiled search serves later store versions too
        model = OrqaModel(configs, special_ids(tokenizer), rc.beam_size, rc.num_read,
                          rc.score_scale, int(corpus.embeddings.shape[0]), corpus.block_size,
                          rc.reader_length or None, rc.strategy, rc.over_retrieve)
        return cls(config, run, mesh, rules, store, tokenizer, watcher, snapshot,
                   corpus, model, AnswerMatcher(store, tokenizer))

    def use(self, snapshot) -> None:
        """Serve `snapshot` (a newer index of the same corpus, perhaps of a newer store
        version): its embeddings and its store version's blocks on the devices, sharded as
        before; answers are matched in that version's blocks."""
        store, self.corpus = _device_corpus(self.config, snapshot, self.store, self.mesh,
                                            self.rules)
        # (the matcher's cached blocks stay valid: a block id names the same tokens in every
        # version where it is live)
        self.store = self.matcher.store = store
        self.snapshot = snapshot

    def encode(self, questions: Sequence[str]) -> dict:
        """`input_ids`, `attention_mask` [N, retrieval.query_length] of the questions."""
        ids, mask = encode_questions(self.tokenizer, self.model.special, questions,
                                     self.config.retrieval.query_length)
        return {"input_ids": ids, "attention_mask": mask}

    def jit(self, fn, param_shardings, batch_sharding):
        """`fn(params, batch, corpus arrays)` jitted on the mesh, its outputs replicated."""
        corpus = jax.tree.map(lambda x: x.sharding, self.corpus.arrays())
        return jax.jit(fn, in_shardings=(param_shardings, batch_sharding, corpus),
                       out_shardings=sharding.replicated(batch_sharding.mesh),
                       compiler_options=config_lib.compiler_options(self.config))


class Predictor:
    """Answers questions (the eval hook, and `realm-jax answer` / `eval` as `load` makes it):
    search, reading and the best span jitted on the mesh (batches of `eval.batch_size`
    questions, the last one padded), the span's text taken from the block's own characters
    on the host. `params`: the default parameters (checkpoint `step`'s)."""

    def __init__(self, setup: Setup, param_shardings, params=None, step: int | None = None):
        self.setup, self.params, self.step = setup, params, step
        self.batch_size = sharding.batch_multiple(setup.config.eval.batch_size, setup.mesh)
        self.batch_sharding = sharding.batch_sharding(setup.mesh)
        self._predict = setup.jit(setup.model.predict, param_shardings, self.batch_sharding)

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, workdir: str | Path,
             step: int | None = None) -> "Predictor":
        """With the parameters of an ORQA run's checkpoint `step` (default the newest)."""
        ckpts = TrainCheckpoints(workdir)
        step = ckpts.step_or_latest(step, ": train first (realm-jax train --config ... "
                                          "--workdir ...)")
        configs = ckpts.model_configs()
        if not set(PARTS) <= set(configs) <= {*PARTS, DOC_TOWER}:
            raise ValueError(f"{workdir}: holds a run of parts {sorted(configs)}, not an ORQA "
                             f"run ({', '.join(PARTS)}, optionally {DOC_TOWER})")
        setup = Setup.create(config, workdir, configs)
        shardings = sharding.part_shardings(configs, setup.mesh, setup.rules)
        return cls(setup, shardings, {part: ckpts.restore_part(step, part, shardings[part])
                                      for part in configs}, step)

    def __call__(self, questions: Sequence[str], params=None) -> list[Answer]:
        params = self.params if params is None else params
        return in_padded_batches(questions, self.batch_size,
                                 lambda batch: self._answer(batch, params))

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        return self(questions)

    def _answer(self, questions: list[str], params) -> list[Answer]:
        s = self.setup
        local = s.encode(questions)
        batch = question_batch(local, self.batch_sharding)
        with sharding.activate(s.mesh, s.rules):
            pred = self._predict(params, batch, s.corpus.arrays())
        pred = {k: np.asarray(v.addressable_data(0)) for k, v in pred.items()}
        out = []
        for i, question in enumerate(questions):
            rows, c = pred["rows"][i], int(pred["candidate"][i])
            found = bool(np.isfinite(pred["score"][i]) and rows[c] >= 0)
            # reader positions -> the block's wordpieces (it follows [CLS] question [SEP])
            start, end = (int(pred[k][i] - local["attention_mask"][i].sum())
                          for k in ("start", "end"))
            passages = tuple(Passage(int(r), s.store.title(int(r)), s.store.text(int(r)),
                                     float(score))
                             for r, score in zip(rows, pred["scores"][i]) if r >= 0)
            out.append(Answer(question,
                              s.matcher.span_text(int(rows[c]), start, end) if found else "",
                              float(pred["score"][i]), passages, c if found else -1))
        return out

    def score(self, examples: Sequence[QAExample], params=None, ks: Sequence[int] = (),
              out: str | Path | None = None) -> tuple[dict, str | None]:
        """(evaluate.summarize's figures, the predictions file `out` if given): exact match
        of the answers, recall@k (`ks`, default 1 and k) over the very blocks the reader
        read."""
        answers = self([ex.question for ex in examples], params)
        return evaluate_answers(examples, answers, tuple(ks) or (1, self.setup.model.num_read),
                                out)

    def evaluate(self, out: str | None = None) -> tuple[dict, str]:
        """`score` of the first `eval.num_questions` (0: all) questions of `data.eval`, with
        the checkpoint "step"; the predictions as JSONL (default
        WORKDIR/eval/predictions.jsonl)."""
        setup, ec = self.setup, self.setup.config.eval
        examples = qa_examples(setup.config, setup.store, "eval", setup.tokenizer)
        if ec.num_questions > 0:
            examples = examples[:ec.num_questions]
        summary, path = self.score(examples, ks=ec.recall_at,
                                   out=out or setup.workdir.eval_dir / "predictions.jsonl")
        return dict(summary, step=self.step), path


# ---------------------------------------------------------------------------------------
# The task

@register
class OrqaTask(QATask):
    """ORQA / REALM open-QA fine-tuning: question batches, the retriever beam searched with
    the live query tower on the devices, answer targets matched on the host, the ORQA loss;
    exact match and recall on the eval questions as a hook."""

    name = "orqa"
    progress_keys = ("loss", "retrieval_loss", "reader_loss", "read_recall", "step_time")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        check_config(config)

    def build(self) -> tuple[dict, dict]:
        return build_models(self.config)

    def dataset(self, run):
        self.setup = setup = Setup.create(self.config, run.workdir, run.configs)
        self.follow(setup.watcher, setup.snapshot)
        self.examples = qa_examples(self.config, setup.store, "train", setup.tokenizer)
        return self.question_dataset()

    def start(self, run) -> None:
        setup = self.setup
        self.run = run
        _log.info("%d training questions, index %s (checkpoint step %d)", len(self.examples),
                  setup.snapshot.version, setup.snapshot.step)
        self.search = setup.jit(setup.model.search, run.param_shardings, run.batch_sharding)

    def serve(self, snapshot) -> None:
        self.setup.use(snapshot)

    def encode(self, questions: Sequence[str]) -> dict:
        return self.setup.encode(questions)

    def make_batch(self, item, params):
        chosen, local = item
        rows = self.search(params, sharding.global_batch(local, self.run.batch_sharding),
                           self.setup.corpus.arrays())
        rows = sharding.local_rows(np.asarray(rows.addressable_data(0)))
        local = dict(local, beam_ids=rows, **answer_targets(self.setup, chosen, local, rows))
        return sharding.global_batch({k: local[k] for k in STEP_FIELDS},
                                     self.run.batch_sharding), None

    def loss(self, params, batch, extras, rng):
        return self.setup.model.loss(params, batch, extras, rng)

    def extras(self):
        return self.setup.corpus.arrays()

    def hooks(self, run) -> list[Hook]:
        tc, rc = self.config.train, self.config.retrieval
        hooks = []
        if rc.drift_every > 0:
            probes = [ex.question for ex in self.examples[:rc.drift_probes]]
            probe = DriftProbe(probes, sharding.batch_multiple(len(probes), run.mesh),
                               drift_rows(self, run), self.index, run.workdir)
            hooks.append(Hook("drift", probe, every=rc.drift_every,
                              shown=("drift/overlap", "staleness")))
        if tc.eval_questions <= 0:
            return hooks
        examples = qa_examples(self.config, self.setup.store, "eval",
                               self.setup.tokenizer)[:tc.eval_questions]
        predictor = Predictor(self.setup, run.param_shardings)

        def evaluate(step: int, params) -> dict:
            summary, _ = predictor.score(examples, params, self.config.eval.recall_at)
            return {EVAL_PREFIX + k: float(v) for k, v in summary.items()}

        return hooks + [Hook("eval", evaluate, every=tc.eval_every)]

    @staticmethod
    def summary(result: dict) -> str | None:
        first, last = result.get("first_eval"), result.get("last_eval")
        if first and last and EVAL_PREFIX + "exact_match" in first:
            key = EVAL_PREFIX + "exact_match"
            return (f"exact match {first[key]:.3f} -> {last[key]:.3f} "
                    f"(steps {first['step']} -> {last['step']})")
        return Task.summary(result)

    @classmethod
    def answerer(cls, config, workdir, step=None) -> Predictor:
        return Predictor.load(config, workdir, step)


def drift_rows(task: OrqaTask, run):
    """The drift hook's `rows` for ORQA: `OrqaModel.drift_rows` of the probe questions,
    jitted on the run's mesh."""
    setup = task.setup
    rows = setup.jit(setup.model.drift_rows, run.param_shardings, run.batch_sharding)

    def fn(questions: list[str], params) -> list:
        batch = question_batch(setup.encode(questions), run.batch_sharding)
        with sharding.activate(run.mesh, run.rules):
            served, exact = rows(params, batch, setup.corpus.arrays())
        return list(zip(*(np.asarray(x.addressable_data(0)) for x in (served, exact))))

    return fn
