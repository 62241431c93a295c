"""RAG fine-tuning (RAG-Token or RAG-Sequence), evaluation and answering.

    realm-jax refresh --config configs/rag.py:tiny --workdir W --once   # the frozen index
    realm-jax train   --config configs/rag.py:tiny --workdir W
    realm-jax eval    --workdir W          realm-jax answer --workdir W "a question?"

The document side is frozen: WORKDIR/index holds the passages (config.data.corpus, a block
store) embedded once by the DPR context encoder (the refresher, from
config.model.context_encoder_hf). For each batch, on the host, the live question encoder
embeds the questions, the snapshot's searcher (ScaNN or exact, `retrieval.backend`) finds
their top `rag.n_docs` passages, and `title / text // question` contexts are tokenized for
the generator. In the jitted step the live question encoder scores those documents again
(so the loss trains it), BART reads the contexts, and the RAG-Token or RAG-Sequence loss
(`rag.loss`) is taken; the question encoder and BART are trained.

Checkpoints hold the params of `models.rag.Rag` ({"question_encoder", "generator"});
WORKDIR/model.json its RagConfig under "rag"; WORKDIR/config.json the experiment config.
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
from jax.experimental import multihost_utils

from realm_jax import config as config_lib
from realm_jax import hf, sharding
from realm_jax.checkpoints import TrainCheckpoints
from realm_jax.data.store import BlockStore
from realm_jax.index.store import SnapshotError
from realm_jax.models import BartConfig, EmbedderConfig, EncoderConfig, RagConfig, random_params
from realm_jax.models.rag import Retrieved, build_contexts, retrieve
from realm_jax.objectives.distill import (emdr2_loss, leave_one_out_marginals, loop_loss,
                                          pdist_loss)
from realm_jax.objectives.rag import (doc_log_probs, rag_sequence_nll, rag_token_nll,
                                      sequence_log_likelihoods)
from realm_jax.tasks.base import Answer, Passage, Task, register
from realm_jax.tasks.common import (DEFAULT_METRICS, evaluate_answers, in_padded_batches,
                                    question_batches)
from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)

MODEL_KEY = "rag"          # the RagConfig's name in WORKDIR/model.json
LOSSES = {"token": rag_token_nll, "sequence": rag_sequence_nll}
RETRIEVER_LOSSES = ("marginal", "emdr2", "pdist", "loop")
BACKENDS = ("scann", "exact")
DECODINGS = ("thorough", "fast")
BATCH_FIELDS = ("question_ids", "question_mask", "doc_embeddings", "context_ids",
                "context_mask", "decoder_input_ids", "labels")
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
                                  ("retrieval.retriever_loss",
                                   config.retrieval.get("retriever_loss", "marginal"),
                                   RETRIEVER_LOSSES),
                                  ("data.format", data_format(config), ("qa", *TASK_FORMATS))):
        if value not in allowed:
            raise ValueError(f"--config.{field}={value!r}: expected one of {', '.join(allowed)}")
    try:
        parse_metrics(eval_metrics(config))
    except ValueError as e:
        raise ValueError(f"--config.eval.metrics: {e}") from None
    if config.eval.get("do_sample") and config.rag.loss == "sequence":
        raise ValueError("--config.eval.do_sample: sampling is RAG-Token decoding's; RAG-Sequence "
                         "decodes by beam search (eval.decoding thorough or fast)")


def data_format(config: ml_collections.ConfigDict) -> str:
    """config.data.format ("qa" for configs written before it existed)."""
    return config.data.get("format", "qa")


def eval_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.eval.metrics (exact match and F1 for configs written before it existed)."""
    return tuple(config.eval.get("metrics", DEFAULT_METRICS))


def label_set(config: ml_collections.ConfigDict):
    """The FEVER classes of data.format fever / fever2 (their generations are mapped back to
    labels before scoring), else None."""
    from realm_jax.data.tasks import fever_labels

    fmt = data_format(config)
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
        q_cfg, q_params = hf.load_embedder(m.question_encoder_hf, **config_lib.model_knobs(m.question_encoder))
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


# ---------------------------------------------------------------------------------------
# Data

def load_examples(config: ml_collections.ConfigDict, which: str) -> list:
    """The examples of config.data.<which> ("train" or "eval"): QA (data.format "qa", with
    its split) or a task's file (`data.tasks.read_task` of data.format: KILT, MS MARCO,
    Jeopardy, FEVER). Each example's input is `question`, its target `answers[0]`."""
    from realm_jax.data.qa import load_qa
    from realm_jax.data.tasks import read_task

    d, fmt = config.data, data_format(config)
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
    top documents in the frozen index (searched on the host) and the documents' contexts."""

    def __init__(self, snapshot, store: BlockStore, cfg: RagConfig, generator_tokenizer,
                 backend: str = "scann", scann_threads: int = 0):
        if snapshot.dim != cfg.retrieval_dim:
            raise ValueError(f"index {snapshot.path} holds {snapshot.dim}-d embeddings; the "
                             f"question encoder makes {cfg.retrieval_dim}-d ones: the index must "
                             "come from the context encoder that goes with "
                             "config.model.question_encoder_hf")
        if backend == "scann":
            try:
                self.searcher = snapshot.scann_searcher(scann_threads)
            except SnapshotError as e:
                raise ValueError(f"{e}: set --config.retrieval.backend=exact, or rebuild the "
                                 "index with a refresh.scann section") from None
        else:
            self.searcher = snapshot.numpy_searcher()
        self.snapshot = snapshot
        self.embeddings = snapshot.block_embeddings()
        self.store, self.cfg, self.tokenizer = store, cfg, generator_tokenizer

    def embed(self, params, question_ids: jax.Array, question_mask: jax.Array) -> np.ndarray:
        """[B, P] question embeddings of the global batch, on every host."""
        q = _embed_questions(self.cfg.question_encoder, params, question_ids, question_mask)
        return np.asarray(multihost_utils.process_allgather(q, tiled=True), np.float32)

    def search(self, question_embeddings: np.ndarray, depth: int) -> Retrieved:
        return retrieve(self.searcher, question_embeddings, self.embeddings, depth)

    def contexts(self, doc_ids: np.ndarray, questions: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
        return build_contexts(self.store, doc_ids, questions, self.tokenizer, self.cfg)


@functools.partial(jax.jit, static_argnums=0)
def _embed_questions(cfg: EmbedderConfig, params, ids, mask):
    return cfg.module().apply({"params": params}, ids, mask)


# ---------------------------------------------------------------------------------------
# The loss

@dataclasses.dataclass(frozen=True)
class RagLossFn:
    """Mean RAG-Token / RAG-Sequence loss per question of a batch (BATCH_FIELDS), with
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

    def __call__(self, params, batch: dict, rng: jax.Array | None):
        out = self.config.module().apply(
            {"params": params}, batch["question_ids"], batch["question_mask"],
            batch["doc_embeddings"], batch["context_ids"], batch["context_mask"],
            batch["decoder_input_ids"], deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng})
        pad = self.config.generator.pad_token_id
        distill = self.retriever_loss != "marginal"
        scores = jax.lax.stop_gradient(out.doc_scores) if distill else out.doc_scores
        nll = functools.partial(LOSSES[self.loss], out.logits, batch["labels"], scores,
                                pad_id=pad, exclude_bos_score=self.exclude_bos_score,
                                reduce=False)
        loss = jnp.mean(nll(epsilon=self.label_smoothing))
        metrics = {"nll": jnp.mean(nll()) if self.label_smoothing else loss,
                   "top_doc_prob": jnp.exp(doc_log_probs(out.doc_scores).max(-1)).mean()}
        if distill:
            ll = sequence_log_likelihoods(out.logits, batch["labels"], pad_id=pad,
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

def _store(config) -> BlockStore:
    if not config.data.corpus:
        raise ValueError("set --config.data.corpus (a passage block store from `realm-jax "
                         "prepare-corpus --mode dpr`)")
    return BlockStore.open(config.data.corpus)


def _retriever(config, workdir: Workdir, store: BlockStore, cfg: RagConfig, tokenizers,
               wait_seconds: float = 0.0) -> "Retriever":
    """The retriever over the newest snapshot of WORKDIR/index (waiting up to
    `wait_seconds` for the refresher to publish one)."""
    snapshot = workdir.wait_for_snapshot(workdir.index_watcher(store), wait_seconds)
    store = workdir.snapshot_store(snapshot, store)
    return Retriever(snapshot, store, cfg, tokenizers.generator, config.retrieval.backend,
                     config.retrieval.scann_threads)


@register
class RagTask(Task):
    """RAG fine-tuning: question batches; on the host the live question encoder's top
    `rag.n_docs` passages from the frozen index and their contexts; in the step the
    RAG-Token or RAG-Sequence loss (`rag.loss`). model.json holds the RagConfig under
    "rag"; the params are its parts {"question_encoder", "generator"}."""

    name = "rag"
    progress_keys = ("loss", "top_doc_prob", "answer_in_docs", "step_time")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        check_config(config)
        self.retriever = None

    def build(self) -> tuple[dict, dict]:
        self.tokenizers = load_tokenizers(self.config)
        cfg, params = build_model(self.config, self.tokenizers)
        rc, rt = self.config.rag, self.config.retrieval
        self.loss_fn = RagLossFn(cfg, rc.loss, rc.label_smoothing, rc.exclude_bos_score,
                                 rt.get("retriever_loss", "marginal"),
                                 rt.get("distill_temperature", 1.0))
        return {MODEL_KEY: cfg}, params

    def param_shardings(self, configs: dict, mesh, rules) -> dict:
        return sharding.part_shardings(configs, mesh, rules)[MODEL_KEY]

    def lr_multipliers(self) -> dict:
        return {"question_encoder": self.config.train.question_encoder_lr_multiplier}

    def dataset(self, run):
        self.store = _store(self.config)
        self.examples = load_examples(self.config, "train")
        regex = [ex.qid for ex in self.examples if ex.is_regex]
        if regex:
            raise ValueError(f"--config.data.train={self.config.data.train}: {len(regex)} "
                             "questions have regular-expression answers (CuratedTrec); RAG "
                             "trains on answer strings")
        return question_batches(len(self.examples), self.config.train.batch_size,
                                self.config.seed, process_index=jax.process_index(),
                                process_count=jax.process_count())

    def start(self, run) -> None:
        c, cfg = self.config, self.loss_fn.config
        self.run = run
        self.retriever = _retriever(c, run.workdir, self.store, cfg, self.tokenizers,
                                    c.train.index_wait_seconds)
        self.encoder = QAEncoder(self.tokenizers, cfg.generator, c.rag.max_source_length,
                                 c.rag.max_target_length)

    def load(self, indices):  # the generator's tokenizer is used in this thread only
        chosen = [self.examples[int(i)] for i in indices]
        return chosen, self.encoder.questions([ex.question for ex in chosen])

    def make_batch(self, item, params):
        """The documents retrieved with the live question encoder, their contexts and the
        targets."""
        chosen, (question_ids, question_mask) = item
        put = self.run.batch_sharding
        batch = sharding.global_batch(dict(question_ids=question_ids,
                                           question_mask=question_mask), put)
        q = self.retriever.embed(params["question_encoder"], batch["question_ids"],
                                 batch["question_mask"])
        found = self.retriever.search(sharding.local_rows(q), self.config.rag.n_docs)
        ctx, ctx_mask = self.retriever.contexts(found.doc_ids, [ex.question for ex in chosen])
        dec, labels = self.encoder.targets([ex.answers[0] for ex in chosen])
        batch.update(sharding.global_batch(dict(
            doc_embeddings=found.doc_embeddings, context_ids=ctx, context_mask=ctx_mask,
            decoder_input_ids=dec, labels=labels), put))
        return batch, lambda: {"answer_in_docs": _answer_in_docs(self.store, found.doc_ids,
                                                                 chosen)}

    def loss(self, params, batch, extras, rng):
        return self.loss_fn(params, batch, rng)

    def checkpoint_meta(self) -> dict:
        return {} if self.retriever is None else {"index": self.retriever.snapshot.version}

    def result(self) -> dict:
        return {"snapshot": self.retriever.snapshot}

    @classmethod
    def answerer(cls, config, workdir, step=None) -> "RagAnswerer":
        return RagAnswerer(config, workdir, step=step)


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
        configs = checkpoints.model_configs()
        if MODEL_KEY not in configs:
            raise ValueError(f"{self.workdir.path('model.json')}: no RAG model (parts: "
                             f"{sorted(configs)})")
        self.step = checkpoints.latest_step() if step is None else int(step)
        if self.step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
        ec, rc = config.eval, config.rag
        self.cfg = configs[MODEL_KEY]
        self.n_docs = ec.n_docs or self.cfg.n_docs
        # Retrieved: the documents read, and enough for recall@k and the metrics' recall@K.
        self.depth = max([self.n_docs, *ec.recall_at, *(
            int(m.partition("@")[2]) for m in eval_metrics(config) if m.startswith("recall@"))])
        self.mesh, self.rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        p_shardings = sharding.part_shardings(configs, self.mesh, self.rules)[MODEL_KEY]
        self.params = {part: checkpoints.restore_part(self.step, part, p_shardings[part])
                       for part in p_shardings}
        self.store = _store(config)
        self.tokenizers = load_tokenizers(config)
        self.retriever = _retriever(config, self.workdir, self.store, self.cfg, self.tokenizers)
        self.encoder = QAEncoder(self.tokenizers, self.cfg.generator, rc.max_source_length,
                                 rc.max_target_length)
        from realm_jax import decode
        gen = decode.GenerationConfig.from_rag(
            self.cfg, num_beams=ec.num_beams, min_length=ec.min_length,
            max_length=ec.max_length or rc.max_target_length + 1,
            length_penalty=ec.length_penalty, **{
                k: ec[k] for k in ("do_sample", "temperature", "top_k", "top_p") if k in ec})
        reader_cfg = self.cfg.replace(n_docs=self.n_docs)
        self._rng = jax.random.key(ec.get("seed", 0)) if gen.do_sample else None
        if rc.loss == "sequence":
            self._decode = functools.partial(decode.rag_sequence_generate, config=reader_cfg,
                                             gen=gen, fast=ec.decoding == "fast")
        else:
            self._decode = functools.partial(decode.rag_token_generate, config=reader_cfg,
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
            found = self.retriever.search(q, self.depth)
            scores = np.einsum("bp,bkp->bk", q, found.doc_embeddings)
            ctx, ctx_mask = self.retriever.contexts(found.doc_ids[:, :self.n_docs], questions)
            sampling = {}
            if self._rng is not None:   # a new key for every batch, from eval.seed
                self._rng, sampling["rng"] = jax.random.split(self._rng)
            out = self._decode(self.params, put(ctx), put(ctx_mask),
                               put(scores[:, :self.n_docs].astype(np.float32)), **sampling)
            sequences, answer_scores = (np.asarray(x) for x in multihost_utils.process_allgather(
                (out.sequences[:, 0], out.scores[:, 0]), tiled=True))
        texts = self.tokenizers.generator.batch_decode(sequences, skip_special_tokens=True)
        store = self.store
        return [Answer(question, text.strip(), float(answer_scores[i]), tuple(
            Passage(int(d), store.title(int(d)), store.text(int(d)), float(s))
            for d, s in zip(found.doc_ids[i], scores[i]) if d >= 0), read=self.n_docs)
            for i, (question, text) in enumerate(zip(questions, texts))]

    def evaluate(self, out: str | None = None, examples=None) -> tuple[dict, str]:
        """Exact match of the generated answers (normalized), recall@k (`eval.recall_at`)
        of the retrieved passages and the task's `eval.metrics` (FEVER's generations mapped to
        labels) on `examples` (default: data.eval, its first eval.num_questions); the
        predictions as JSONL (default WORKDIR/eval/predictions.jsonl). The figures include
        the checkpoint "step"."""
        if examples is None:
            examples = load_examples(self.config, "eval")
            if self.config.eval.num_questions:
                examples = examples[:self.config.eval.num_questions]
        answers = self.answer([ex.question for ex in examples])
        summary, path = evaluate_answers(examples, answers, self.config.eval.recall_at,
                                         out or self.workdir.eval_dir / "predictions.jsonl",
                                         eval_metrics(self.config), label_set(self.config))
        return dict(summary, step=self.step), path
