"""RAG fine-tuning (RAG-Token or RAG-Sequence), evaluation and answering.

    realm-jax refresh --config configs/rag.py:tiny --workdir W --once   # the frozen index
    realm-jax train   --config configs/rag.py:tiny --workdir W
    realm-jax eval    --workdir W          realm-jax answer --workdir W "a question?"

By default the document side is frozen: WORKDIR/index holds the passages (config.data.corpus,
a block store) embedded once by the DPR context encoder (the refresher, from
config.model.context_encoder_hf). For each batch, on the host, the live question encoder
embeds the questions, the snapshot's searcher (ScaNN or exact, `retrieval.backend`) finds
their top `rag.n_docs` passages, and `title / text // question` contexts are tokenized for
the generator. In the jitted step the live question encoder scores those documents again
(so the loss trains it), BART reads the contexts, and the RAG-Token or RAG-Sequence loss
(`rag.loss`) is taken; the question encoder and BART are trained.

End to end (`model.train_doc_tower`, `retrieval.strategy` "refresh" or "rerank", drift;
tasks/end_to_end.py): a `doc_tower` part, the context encoder, is trained too. The batch
carries the kept passages' rows as the refresher builds them (`[CLS] title [SEP] text
[SEP]`, index.embed_corpus.RowBuilder), the step embeds them with the live document tower,
so the loss reaches it; "rerank" embeds the proposed passages in a jitted call before it.

Checkpoints hold the params of `models.rag.Rag` ({"question_encoder", "generator"}, plus
"doc_tower" when it trains); WORKDIR/model.json its RagConfig under "rag" (and the
document tower's EmbedderConfig under "doc_tower"); WORKDIR/config.json the experiment
config. Runs made before the document tower could train load and resume as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from realm_jax import config as config_lib
from realm_jax import hf, sharding
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.data.store import BlockStore
from realm_jax.index.embed_corpus import TITLE_CHOICES, RowBuilder
from realm_jax.index.store import SnapshotError
from realm_jax.models import BartConfig, EmbedderConfig, EncoderConfig, RagConfig, random_params
from realm_jax.models.rag import Rag, RagOutput, Retrieved, build_contexts, retrieve
from realm_jax.models.towers import relevance_scores
from realm_jax.objectives.distill import (emdr2_loss, leave_one_out_marginals, loop_loss,
                                          pdist_loss)
from realm_jax.objectives.rag import (doc_log_probs, rag_sequence_nll, rag_token_nll,
                                      sequence_log_likelihoods)
from realm_jax.tasks import end_to_end
from realm_jax.tasks.base import Answer, Hook, Passage, register
from realm_jax.tasks.common import (QATask, evaluate_answers, in_padded_batches, jit_apply,
                                    open_corpus)
from realm_jax.tasks.end_to_end import (DOC_TOWER, DriftProbe, Strategy, embed_docs, live_top,
                                        question_batch)
from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)

MODEL_KEY = "rag"          # the RagConfig's name in WORKDIR/model.json
LOSSES = {"token": rag_token_nll, "sequence": rag_sequence_nll}
RETRIEVER_LOSSES = ("marginal", "emdr2", "pdist", "loop")
BACKENDS = ("scann", "exact")
DECODINGS = ("thorough", "fast")
RAG_PARTS = ("question_encoder", "generator")   # the params of models.rag.Rag
PASSAGES = "a passage block store from `realm-jax prepare-corpus --mode dpr`"   # data.corpus
# Where a Hugging Face RAG folder keeps its two tokenizers.
_TOKENIZER_SUBFOLDERS = {"question": "question_encoder_tokenizer",
                         "generator": "generator_tokenizer"}


def check_config(config: ml_collections.ConfigDict) -> None:
    """The choices of a RAG config, each error naming its field."""
    from realm_jax.data.tasks import TASK_FORMATS
    from realm_jax.evaluate import parse_metrics

    for field, value, allowed in (("rag.loss", config.rag.loss, tuple(LOSSES)),
                                  ("retrieval.backend", config.retrieval.backend, BACKENDS),
                                  ("eval.decoding", config.eval.decoding, DECODINGS),
                                  ("retrieval.retriever_loss", config.retrieval.retriever_loss,
                                   RETRIEVER_LOSSES),
                                  ("data.format", config.data.format, ("qa", *TASK_FORMATS))):
        if value not in allowed:
            raise ValueError(f"--config.{field}={value!r}: expected one of {', '.join(allowed)}")
    try:
        parse_metrics(config.eval.metrics)
    except ValueError as e:
        raise ValueError(f"--config.eval.metrics: {e}") from None
    end_to_end.check_config(config, config.rag.n_docs, "rag.n_docs")
    if config.eval.do_sample and config.rag.loss == "sequence":
        raise ValueError("--config.eval.do_sample: sampling is RAG-Token decoding's; RAG-Sequence "
                         "decodes by beam search (eval.decoding thorough or fast)")


def label_set(config: ml_collections.ConfigDict):
    """The FEVER classes of data.format fever / fever2 (their generations are mapped back to
    labels before scoring), else None."""
    from realm_jax.data.tasks import fever_labels

    fmt = config.data.format
    return fever_labels(3 if fmt == "fever" else 2) if fmt in ("fever", "fever2") else None


# ---------------------------------------------------------------------------------------
# Tokenizers and models

@dataclasses.dataclass(frozen=True)
class Tokenizers:
    question: Any    # the question encoder's (transformers) tokenizer
    generator: Any   # BART's


def load_tokenizers(config: ml_collections.ConfigDict) -> Tokenizers:
    """config.data.question_tokenizer / generator_tokenizer, else the model folders' own
    (a RAG folder's `question_encoder_tokenizer` / `generator_tokenizer` subfolders)."""
    def load(kind: str, field: str, model_field: str):
        folder = config.data[field] or config.model[model_field]
        if not folder:
            raise ValueError(f"no {kind} tokenizer: set --config.data.{field} or "
                             f"--config.model.{model_field} (a Hugging Face folder)")
        sub = Path(folder) / _TOKENIZER_SUBFOLDERS[kind]
        return hf.load_tokenizer(sub if sub.is_dir() else folder)

    return Tokenizers(load("question", "question_tokenizer", "question_encoder_hf"),
                      load("generator", "generator_tokenizer", "generator_hf"))


def _is_rag_folder(folder: str) -> bool:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "rag"
    except (OSError, ValueError):
        return False


def _generator_token_ids(tok) -> dict:
    """BART's special ids from a tokenizer (BERT-style ones: [CLS] as bos, [SEP] as eos);
    decoding starts from eos, as BART's does."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if None in (bos, eos, tok.pad_token_id):
        raise ValueError(f"the generator tokenizer {tok.name_or_path} lacks a bos/cls, eos/sep "
                         "or pad token")
    return dict(pad_token_id=tok.pad_token_id, bos_token_id=bos, eos_token_id=eos,
                decoder_start_token_id=eos)


def build_model(config: ml_collections.ConfigDict, tokenizers: Tokenizers
                ) -> tuple[RagConfig, dict]:
    """(RagConfig, host params) from `config.model`: each part from its HF folder
    (`question_encoder_hf`: a DPR question encoder, any retriever tower or a RAG folder;
    `generator_hf`: BART or a RAG folder), else random weights of the section's sizes, the
    vocabulary (vocab_size 0) and special ids taken from the part's tokenizer."""
    m, rc = config.model, config.rag
    loaded: dict = {}

    def load(folder: str, section) -> tuple[Any, dict]:
        knobs = config_lib.model_knobs(section)
        key = (folder, tuple(sorted(knobs.items())))
        if key not in loaded:
            loaded[key] = hf.load(folder, **knobs)
        return loaded[key]

    base = None
    if not m.question_encoder_hf:
        section = dict(m.question_encoder.to_dict(), pad_token_id=tokenizers.question.pad_token_id)
        section["vocab_size"] = section["vocab_size"] or len(tokenizers.question)
        q_cfg = EmbedderConfig(EncoderConfig(**section), pooling="cls")
        q_params = random_params(q_cfg, config.seed)
    elif _is_rag_folder(m.question_encoder_hf):
        base, params = load(m.question_encoder_hf, m.question_encoder)
        q_cfg, q_params = base.question_encoder, params["question_encoder"]
    else:
        q_cfg, q_params = hf.load_embedder(m.question_encoder_hf,
                                           **config_lib.model_knobs(m.question_encoder))
    if not m.generator_hf:
        section = dict(m.generator.to_dict(), **_generator_token_ids(tokenizers.generator))
        section["vocab_size"] = section["vocab_size"] or len(tokenizers.generator)
        g_cfg = BartConfig(**section)
        g_params = random_params(g_cfg, config.seed + 1)
    else:
        cfg, params = load(m.generator_hf, m.generator)
        if isinstance(cfg, RagConfig):
            base = base or cfg
            g_cfg, g_params = cfg.generator, params["generator"]
        elif isinstance(cfg, BartConfig):
            g_cfg, g_params = cfg, params
        else:
            raise ValueError(f"--config.model.generator_hf={m.generator_hf}: holds a "
                             f"{type(cfg).__name__}, not BART or RAG")
    for what, size, tok in (("question_encoder", q_cfg.encoder.vocab_size, tokenizers.question),
                            ("generator", g_cfg.vocab_size, tokenizers.generator)):
        if len(tok) > size:
            raise ValueError(f"the {what}'s vocabulary ({size}) is smaller than its tokenizer's "
                             f"({len(tok)}, {tok.name_or_path}): check config.model.{what}"
                             f"{'_hf' if m[what + '_hf'] else '.vocab_size'}")
    if base is None:   # a BART checkpoint, or random: targets start with bos, end with eos
        base = RagConfig(q_cfg, g_cfg, forced_bos_token_id=g_cfg.bos_token_id,
                         forced_eos_token_id=g_cfg.eos_token_id)
    arch = "RagSequenceForGeneration" if rc.loss == "sequence" else "RagTokenForGeneration"
    cfg = base.replace(question_encoder=q_cfg, generator=g_cfg, n_docs=rc.n_docs,
                       max_combined_length=rc.max_combined_length, hf_architecture=arch)
    return cfg, {"question_encoder": q_params, "generator": g_params}


def build_doc_tower(config: ml_collections.ConfigDict) -> tuple[EmbedderConfig, dict]:
    """(EmbedderConfig, host params) of the trainable document tower (model.train_doc_tower):
    the context encoder that built the index, `model.context_encoder_hf`, with the question
    encoder section's run knobs (dtype, attention, ...)."""
    folder = config.model.context_encoder_hf or config.refresh.doc_tower_hf
    if not folder:
        raise ValueError("model.train_doc_tower: set --config.model.context_encoder_hf (the "
                         "context encoder the index was built with)")
    return hf.load_embedder(folder, **config_lib.model_knobs(config.model.question_encoder))


# ---------------------------------------------------------------------------------------
# Data

def load_examples(config: ml_collections.ConfigDict, which: str) -> list:
    """The examples of config.data.<which> ("train" or "eval"): QA (data.format "qa", with
    its split) or a task's file (`data.tasks.read_task` of data.format: KILT, MS MARCO,
    Jeopardy, FEVER). Each example's input is `question`, its target `answers[0]`."""
    from realm_jax.data.qa import load_qa
    from realm_jax.data.tasks import read_task

    d, fmt = config.data, config.data.format
    if not d[which]:
        raise ValueError(f"set --config.data.{which} (" + (
            "a QA file: .jsonl, .json, .tsv; or tfds:NAME)" if fmt == "qa"
            else f"a {fmt} file, data.format={fmt!r})"))
    if fmt == "qa":
        return load_qa(d[which], split=d[f"{which}_split"], data_dir=d.data_dir or None)
    return read_task(d[which], fmt)


@dataclasses.dataclass(frozen=True)
class QAEncoder:
    """Questions for the question encoder; answers as BART targets: labels `bos answer eos`
    padded, decoder inputs the labels shifted right behind the decoder start token."""
    tokenizers: Tokenizers
    generator: BartConfig
    max_source_length: int
    max_target_length: int

    def questions(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizers.question(list(questions), max_length=self.max_source_length,
                                       padding="max_length", truncation=True, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def targets(self, answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        labels = self.tokenizers.generator(
            list(answers), max_length=self.max_target_length, padding="max_length",
            truncation=True, return_tensors="np")["input_ids"].astype(np.int32)
        start = np.full((len(labels), 1), self.generator.decoder_start_token_id, np.int32)
        return np.concatenate([start, labels[:, :-1]], axis=1), labels


class Retriever:
    """Question embeddings (the live question encoder, jitted over the sharded batch), their
    top documents in `snapshot` (searched on the host, `retrieval.backend`) and the
    documents' contexts, read from the snapshot's own version of the corpus `store`."""

    def __init__(self, config: ml_collections.ConfigDict, snapshot, store: BlockStore,
                 cfg: RagConfig, generator_tokenizer):
        if snapshot.dim != cfg.retrieval_dim:
            raise ValueError(f"index {snapshot.path} holds {snapshot.dim}-d embeddings; the "
                             f"question encoder makes {cfg.retrieval_dim}-d ones: the index must "
                             "come from the context encoder that goes with "
                             "config.model.question_encoder_hf")
        if config.retrieval.backend == "scann":
            try:
                self.searcher = snapshot.scann_searcher(config.retrieval.scann_threads)
            except SnapshotError as e:
                raise ValueError(f"{e}: set --config.retrieval.backend=exact, or rebuild the "
                                 "index with a refresh.scann section") from None
        else:
            self.searcher = snapshot.numpy_searcher()
        self.snapshot = snapshot
        self.embeddings = snapshot.block_embeddings()
        self.store = Workdir.snapshot_store(snapshot, store)
        self.cfg, self.tokenizer = cfg, generator_tokenizer

    def embed(self, params, question_ids: jax.Array, question_mask: jax.Array) -> np.ndarray:
        """[B, P] question embeddings of the global batch, on every host."""
        q = jit_apply(self.cfg.question_encoder, params, question_ids, question_mask)
        return np.asarray(multihost_utils.process_allgather(q, tiled=True), np.float32)

    def search(self, question_embeddings: np.ndarray, depth: int) -> Retrieved:
        return retrieve(self.searcher, question_embeddings, self.embeddings, depth)

    def contexts(self, doc_ids: np.ndarray, questions: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
        return build_contexts(self.store, doc_ids, questions, self.tokenizer, self.cfg)


@dataclasses.dataclass(frozen=True)
class LiveDocs:
    """The trainable document tower's view of retrieved passages: their rows as the
    refresher embeds them (`rows`, a RowBuilder of the served snapshot's store, padded to
    its max_length) and the best of a pool by live score (`choose`)."""

    config: EmbedderConfig
    rows: RowBuilder

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, tower: EmbedderConfig,
               store: BlockStore) -> "LiveDocs":
        """Rows as `realm-jax refresh` builds them with this config: `refresh.title`,
        `refresh.max_length` (0: the tower's positions), the tokenizer data.tokenizer or
        else the context encoder's folder."""
        tokenizer = config.data.tokenizer or config.model.context_encoder_hf
        length = config.refresh.max_length or tower.encoder.max_position_embeddings
        return cls(tower, RowBuilder.for_store(store, tokenizer, max_length=length,
                                               title=TITLE_CHOICES[config.refresh.title]))

    def tokens(self, doc_ids: np.ndarray) -> dict:
        """{"doc_tokens", "doc_mask"} [B, R, L] of passages `doc_ids` [B, R] (-1: an empty
        row, one visible pad token)."""
        b, r = doc_ids.shape
        length, pad = self.rows.max_length, self.config.encoder.pad_token_id
        tokens = np.full((b * r, length), pad, np.int32)
        mask = np.zeros((b * r, length), np.int32)
        flat = doc_ids.reshape(-1)
        real = np.flatnonzero(flat >= 0)
        for i, row in zip(real, self.rows.rows(flat[real])):
            tokens[i, :len(row)], mask[i, :len(row)] = row, 1
        mask[flat < 0, 0] = 1
        return {"doc_tokens": tokens.reshape(b, r, length), "doc_mask": mask.reshape(b, r, length)}

    def choose(self, params, questions: np.ndarray, pool: np.ndarray, k: int, put
               ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, live scores) [B, k] of the best k of `pool` [B, R] (best first) by the live
        towers: questions [B, P] . the pool's rows embedded by `params` (the doc_tower part).
        `put(dict) -> dict` makes global batch arrays of the host's rows; the results are
        the global batch's, on every host."""
        arrays = put(dict(self.tokens(pool), questions=questions.astype(np.float32),
                          pool=pool.astype(np.int32)))
        out = _live_choice(self.config, k, params, arrays)
        return tuple(np.asarray(x) for x in multihost_utils.process_allgather(out, tiled=True))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _live_choice(cfg: EmbedderConfig, k: int, params, arrays: dict):
    docs = embed_docs(cfg, params, arrays["doc_tokens"], arrays["doc_mask"])
    kept = live_top(arrays["pool"], docs, arrays["questions"], k)
    return kept.ids, kept.scores


# ---------------------------------------------------------------------------------------
# The loss

@dataclasses.dataclass(frozen=True)
class RagLossFn:
    """Mean RAG-Token / RAG-Sequence loss per question of a batch (question_ids,
    question_mask, context_ids, context_mask, decoder_input_ids, labels, and the documents:
    `doc_embeddings` from the index, or with `doc_tower` their rows `doc_tokens`,
    `doc_mask` embedded by the live document tower, the params' "doc_tower" part), with
    dropout when given an rng; metrics: loss, nll (without label smoothing), top_doc_prob
    (the mean largest p(z|x)).

    `retriever_loss` other than "marginal": the generator's loss is taken with the document
    scores under stop_gradient, and the question encoder is trained by EMDR², perplexity
    distillation or LOOP (objectives/distill.py, `distill_temperature`) towards the
    generator's per-document log-likelihoods of the target (the RAG-Sequence loss's own
    per-document term, `sequence_log_likelihoods`, stop-gradient); the loss is their sum,
    `retriever_loss` and `generator_loss` logged apart."""
    config: RagConfig
    loss: str = "token"
    label_smoothing: float = 0.0
    exclude_bos_score: bool = False
    retriever_loss: str = "marginal"
    distill_temperature: float = 1.0
    doc_tower: EmbedderConfig | None = None   # trained (model.train_doc_tower)

    def outputs(self, params, batch: dict, rng: jax.Array | None) -> RagOutput:
        """The generator's logits and the document scores, by the live question encoder
        against the index's embeddings (no gradient to them) or the live document tower's."""
        rng_docs = None
        if rng is not None and self.doc_tower is not None:
            rng, rng_docs = jax.random.split(rng)
        apply = functools.partial(
            self.config.module().apply, {"params": {part: params[part] for part in RAG_PARTS}},
            deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
        if self.doc_tower is None:
            return apply(batch["question_ids"], batch["question_mask"], batch["doc_embeddings"],
                         batch["context_ids"], batch["context_mask"], batch["decoder_input_ids"])
        questions = apply(batch["question_ids"], batch["question_mask"],
                          method=Rag.embed_questions)
        docs = embed_docs(self.doc_tower, params[DOC_TOWER], batch["doc_tokens"],
                          batch["doc_mask"], rng_docs).astype(jnp.float32)
        logits = apply(batch["context_ids"], batch["context_mask"], batch["decoder_input_ids"],
                       method=Rag.generator_logits)
        scores = nn.with_logical_constraint(relevance_scores(questions, docs), ("batch", None))
        return RagOutput(logits, scores)

    def __call__(self, params, batch: dict, rng: jax.Array | None):
        return self.head(self.outputs(params, batch, rng), batch["labels"])

    def head(self, out: RagOutput, labels: jax.Array):
        """(loss, metrics) of the model's outputs against the target `labels` [B, T]: the
        RAG loss and the retriever's (pure; the same for every strategy, which only changes
        where `out.doc_scores` come from)."""
        pad = self.config.generator.pad_token_id
        distill = self.retriever_loss != "marginal"
        scores = jax.lax.stop_gradient(out.doc_scores) if distill else out.doc_scores
        nll = functools.partial(LOSSES[self.loss], out.logits, labels, scores,
                                pad_id=pad, exclude_bos_score=self.exclude_bos_score,
                                reduce=False)
        loss = jnp.mean(nll(epsilon=self.label_smoothing))
        metrics = {"nll": jnp.mean(nll()) if self.label_smoothing else loss,
                   "top_doc_prob": jnp.exp(doc_log_probs(out.doc_scores).max(-1)).mean()}
        if distill:
            ll = sequence_log_likelihoods(out.logits, labels, pad_id=pad,
                                          exclude_bos_score=self.exclude_bos_score)
            retriever = self.retriever_term(out.doc_scores, ll)
            metrics.update(generator_loss=loss, retriever_loss=retriever.loss,
                           retriever_top1_agreement=retriever.metrics["top1_agreement"])
            loss = loss + retriever.loss
        metrics["loss"] = loss
        return loss, metrics

    def retriever_term(self, doc_scores: jax.Array, log_likelihoods: jax.Array):
        """The `retriever_loss` over the document scores [B, K] and the generator's
        per-document log-likelihoods [B, K] (a distill.RetrieverLoss)."""
        t = self.distill_temperature
        if self.retriever_loss == "emdr2":
            return emdr2_loss(doc_scores, log_likelihoods)
        if self.retriever_loss == "pdist":
            return pdist_loss(doc_scores, log_likelihoods, temperature=t)
        if self.retriever_loss == "loop":
            loo = leave_one_out_marginals(doc_scores, jax.lax.stop_gradient(log_likelihoods))
            return loop_loss(doc_scores, loo, temperature=t)
        raise ValueError(f"retrieval.retriever_loss={self.retriever_loss!r}: expected one of "
                         f"{', '.join(RETRIEVER_LOSSES)}")


# ---------------------------------------------------------------------------------------
# The task

@register
class RagTask(QATask):
    """RAG fine-tuning (see the module docstring): retrieval with the live question encoder
    on the host, the RAG-Token or RAG-Sequence loss in the step."""

    name = "rag"
    progress_keys = ("loss", "top_doc_prob", "answer_in_docs", "step_time")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        check_config(config)
        self.how = Strategy.from_config(config)

    def build(self) -> tuple[dict, dict]:
        self.tokenizers = load_tokenizers(self.config)
        cfg, params = build_model(self.config, self.tokenizers)
        configs = {MODEL_KEY: cfg}
        if self.config.model.train_doc_tower:
            configs[DOC_TOWER], params[DOC_TOWER] = build_doc_tower(self.config)
        rc, rt = self.config.rag, self.config.retrieval
        self.loss_fn = RagLossFn(cfg, rc.loss, rc.label_smoothing, rc.exclude_bos_score,
                                 rt.retriever_loss, rt.distill_temperature, configs.get(DOC_TOWER))
        return configs, params

    def param_shardings(self, configs: dict, mesh, rules) -> dict:
        return rag_param_shardings(configs, mesh, rules)

    def lr_multipliers(self) -> dict:
        """The retriever's towers (question encoder and a trained context encoder) at
        train.question_encoder_lr_multiplier."""
        factor = self.config.train.question_encoder_lr_multiplier
        return {"question_encoder": factor,
                **({DOC_TOWER: factor} if self.config.model.train_doc_tower else {})}

    def dataset(self, run):
        self.store = open_corpus(self.config, what=PASSAGES)
        self.examples = load_examples(self.config, "train")
        regex = [ex.qid for ex in self.examples if ex.is_regex]
        if regex:
            raise ValueError(f"--config.data.train={self.config.data.train}: {len(regex)} "
                             "questions have regular-expression answers (CuratedTrec); RAG "
                             "trains on answer strings")
        return self.question_dataset()

    def start(self, run) -> None:
        c = self.config
        self.run = run
        self.serve_first(run.workdir, run.workdir.index_watcher(self.store))
        self.encoder = QAEncoder(self.tokenizers, self.loss_fn.config.generator,
                                 c.rag.max_source_length, c.rag.max_target_length)

    def serve(self, snapshot) -> None:
        """Serve `snapshot`: its retriever, and the rows of its store for a live tower."""
        self.retriever = Retriever(self.config, snapshot, self.store, self.loss_fn.config,
                                   self.tokenizers.generator)
        self.live = (LiveDocs.create(self.config, self.loss_fn.doc_tower, self.retriever.store)
                     if self.how.live_docs else None)

    def step_metrics(self, step: int) -> dict:
        return super().step_metrics(step) if self.how.live_docs else {}

    def encode(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.questions(questions)  # the tokenizer is used in this thread only

    def documents(self, params, questions: np.ndarray, put) -> tuple[np.ndarray, dict]:
        """(ids [B, n_docs], the batch's document fields) of questions [B, P] (this host's
        rows): the index's top n_docs, or ("rerank") the live towers' best of its top
        over_retrieve; their index embeddings ("query_side") or rows for the live document
        tower. `put`: global batch arrays of this host's rows."""
        k = self.config.rag.n_docs
        found = self.retriever.search(questions, self.how.pool_depth(k))
        if not self.how.live_docs:
            return found.doc_ids, put({"doc_embeddings": found.doc_embeddings})
        ids = found.doc_ids[:, :k]
        if self.how.name == "rerank":
            ids = sharding.local_rows(self.live.choose(params[DOC_TOWER], questions,
                                                       found.doc_ids, k, put)[0])
        return ids, put(self.live.tokens(ids))

    def make_batch(self, item, params):
        chosen, (question_ids, question_mask) = item
        put = functools.partial(sharding.global_batch, sharding=self.run.batch_sharding)
        batch = put(dict(question_ids=question_ids, question_mask=question_mask))
        q = self.retriever.embed(params["question_encoder"], batch["question_ids"],
                                 batch["question_mask"])
        doc_ids, docs = self.documents(params, sharding.local_rows(q), put)
        ctx, ctx_mask = self.retriever.contexts(doc_ids, [ex.question for ex in chosen])
        dec, labels = self.encoder.targets([ex.answers[0] for ex in chosen])
        batch.update(docs, **put(dict(context_ids=ctx, context_mask=ctx_mask,
                                      decoder_input_ids=dec, labels=labels)))
        return batch, lambda: {"answer_in_docs": _answer_in_docs(self.store, doc_ids, chosen)}

    def loss(self, params, batch, extras, rng):
        return self.loss_fn(params, batch, rng)

    def hooks(self, run) -> list[Hook]:
        rc = self.config.retrieval
        if rc.get("drift_every", 0) <= 0:
            return []
        probes = [ex.question for ex in self.examples[:rc.drift_probes]]
        # Tokenized here, before the prefetch thread uses the question tokenizer.
        self.probes = dict(zip(probes, zip(*self.encoder.questions(probes))))
        probe = DriftProbe(probes, self.config.train.batch_size, self.drift_rows,
                           self.index, run.workdir)
        return [Hook("drift", probe, every=rc.drift_every, shown=("drift/overlap", "staleness"))]

    def drift_rows(self, questions: list[str], params) -> list:
        """The drift hook's `rows`: the served index's top n_docs of each question against
        the live towers' exact top n_docs over the index's best max(over_retrieve, n_docs)
        passages freshly embedded (questions: the whole batch of probes, on every host)."""
        put = functools.partial(question_batch, batch_sharding=self.run.batch_sharding)
        ids, mask = (np.stack(x) for x in zip(*(self.probes[q] for q in questions)))
        batch = put(dict(question_ids=ids, question_mask=mask))
        q = self.retriever.embed(params["question_encoder"], batch["question_ids"],
                                 batch["question_mask"])
        k = self.config.rag.n_docs
        pool = self.retriever.search(q, self.how.probe_depth(k)).doc_ids
        exact, _ = self.live.choose(params[DOC_TOWER], q, pool, k, put)
        return list(zip(pool[:, :k], exact))

    @classmethod
    def answerer(cls, config, workdir, step=None) -> "RagAnswerer":
        return RagAnswerer(config, workdir, step=step)


def rag_param_shardings(configs: dict, mesh, rules) -> dict:
    """NamedShardings of a RAG run's params: the RagConfig's parts at the top level (and
    the document tower's)."""
    shardings = sharding.part_shardings(configs, mesh, rules)
    return dict(shardings.pop(MODEL_KEY), **shardings)


def _answer_in_docs(store: BlockStore, doc_ids: np.ndarray, examples: Sequence) -> float:
    """The fraction of questions with an answer in the text of a retrieved document."""
    from realm_jax.evaluate import has_answer

    return float(np.mean([any(has_answer(store.text(int(i)), ex.answers, regex=ex.is_regex)
                              for i in row if i >= 0) for row, ex in zip(doc_ids, examples)]))


# ---------------------------------------------------------------------------------------
# Evaluation and answering

class RagAnswerer:
    """A RAG workdir's model, ready to answer: a checkpoint's params on the mesh, the frozen
    index, and the decoder of `rag.loss` (RAG-Token beam search; RAG-Sequence thorough or
    fast decoding as `eval.decoding`), reading `eval.n_docs` documents per question. One
    process (its devices form the mesh): evaluation is not split over hosts."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, *,
                 step: int | None = None):
        check_config(config)
        if jax.process_count() > 1:
            raise ValueError("RAG evaluation and answering run in one process; this is "
                             f"process {jax.process_index()} of {jax.process_count()}")
        self.config, self.workdir = config, Workdir(workdir)
        checkpoints = TrainCheckpoints(self.workdir)
        configs = checkpoints.model_configs(MODEL_KEY)
        self.step = checkpoints.step_or_latest(step)
        ec, rc = config.eval, config.rag
        self.cfg = configs[MODEL_KEY]
        self.n_docs = ec.n_docs or self.cfg.n_docs
        # Retrieved: the documents read, and enough for recall@k and the metrics' recall@K.
        self.depth = max([self.n_docs, *ec.recall_at, *(
            int(m.partition("@")[2]) for m in config.eval.metrics if m.startswith("recall@"))])
        self.mesh = sharding.mesh_from_config(config)
        self.rules = sharding.rules_from_config(config)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        p_shardings = rag_param_shardings(configs, self.mesh, self.rules)
        self.params = {part: checkpoints.restore_part(self.step, part, p_shardings[part])
                       for part in p_shardings}
        self.store = open_corpus(config, what=PASSAGES)
        self.tokenizers = load_tokenizers(config)
        self.retriever = Retriever(config, self.workdir.wait_for_snapshot(
            self.workdir.index_watcher(self.store), 0.0), self.store, self.cfg,
            self.tokenizers.generator)
        # A trained document tower scores (and with "rerank" chooses) the passages live.
        self.how = Strategy.from_config(config)
        self.live = (LiveDocs.create(config, configs[DOC_TOWER], self.retriever.store)
                     if DOC_TOWER in configs else None)
        self.encoder = QAEncoder(self.tokenizers, self.cfg.generator, rc.max_source_length,
                                 rc.max_target_length)
        from realm_jax import decode
        gen = decode.GenerationConfig.from_rag(
            self.cfg, num_beams=ec.num_beams, min_length=ec.min_length,
            max_length=ec.max_length or rc.max_target_length + 1,
            length_penalty=ec.length_penalty, **{
                k: ec[k] for k in ("do_sample", "temperature", "top_k", "top_p")})
        self._rng = jax.random.key(ec.seed) if gen.do_sample else None
        generate = (functools.partial(decode.rag_sequence_generate, fast=ec.decoding == "fast")
                    if rc.loss == "sequence" else decode.rag_token_generate)
        self._decode = functools.partial(generate, config=self.cfg.replace(n_docs=self.n_docs),
                                         gen=gen)

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        """Answers in batches of eval.batch_size (the last one padded), with the passages
        read (eval.n_docs) and the question encoder's scores of them."""
        return in_padded_batches(questions, self.config.eval.batch_size, self._answer)

    def _answer(self, questions: list[str]) -> list[Answer]:
        put = lambda x: sharding.global_batch({"x": x}, self.batch_sharding)["x"]  # noqa: E731
        with sharding.activate(self.mesh, self.rules):
            ids, mask = self.encoder.questions(questions)
            q = self.retriever.embed(self.params["question_encoder"], put(ids), put(mask))
            doc_ids, scores = self._documents(q)
            ctx, ctx_mask = self.retriever.contexts(doc_ids[:, :self.n_docs], questions)
            sampling = {}
            if self._rng is not None:   # a new key for every batch, from eval.seed
                self._rng, sampling["rng"] = jax.random.split(self._rng)
            out = self._decode({p: self.params[p] for p in RAG_PARTS}, put(ctx), put(ctx_mask),
                               put(scores[:, :self.n_docs].astype(np.float32)), **sampling)
            sequences, answer_scores = (np.asarray(x) for x in multihost_utils.process_allgather(
                (out.sequences[:, 0], out.scores[:, 0]), tiled=True))
        texts = self.tokenizers.generator.batch_decode(sequences, skip_special_tokens=True)
        store = self.store
        return [Answer(question, text.strip(), float(answer_scores[i]), tuple(
            Passage(int(d), store.title(int(d)), store.text(int(d)), float(s))
            for d, s in zip(doc_ids[i], scores[i]) if d >= 0), read=self.n_docs)
            for i, (question, text) in enumerate(zip(questions, texts))]

    def _documents(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) [B, depth] of the passages retrieved for question embeddings:
        the index's, scored by its embeddings; with a trained document tower the best by
        live score of the index's top depth (max(over_retrieve, depth) under "rerank")."""
        if self.live is None:
            found = self.retriever.search(q, self.depth)
            return found.doc_ids, np.einsum("bp,bkp->bk", q, found.doc_embeddings)
        pool = self.retriever.search(q, self.how.pool_depth(self.depth)).doc_ids
        put = functools.partial(question_batch, batch_sharding=self.batch_sharding)
        return self.live.choose(self.params[DOC_TOWER], q, pool, self.depth, put)

    def evaluate(self, out: str | None = None, examples=None) -> tuple[dict, str]:
        """`evaluate_answers` on `examples` (default: the first eval.num_questions of
        data.eval) with `eval.recall_at` and `eval.metrics`, FEVER's generations mapped to
        labels, plus the checkpoint "step"; predictions to `out` (default
        WORKDIR/eval/predictions.jsonl)."""
        if examples is None:
            examples = load_examples(self.config, "eval")
            if self.config.eval.num_questions:
                examples = examples[:self.config.eval.num_questions]
        answers = self.answer([ex.question for ex in examples])
        summary, path = evaluate_answers(examples, answers, self.config.eval.recall_at,
                                         out or self.workdir.eval_dir / "predictions.jsonl",
                                         tuple(self.config.eval.metrics), label_set(self.config))
        return dict(summary, step=self.step), path
