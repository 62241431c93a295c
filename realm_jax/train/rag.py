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

import concurrent.futures
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import hf, sharding
from realm_jax.data.store import BlockStore
from realm_jax.index.store import IndexStore, SnapshotError, SnapshotWatcher
from realm_jax.models import BartConfig, EmbedderConfig, EncoderConfig, RagConfig
from realm_jax.models.rag import Retrieved, build_contexts, retrieve
from realm_jax.objectives.rag import doc_log_probs, rag_sequence_nll, rag_token_nll
from realm_jax.train import loop, realm
from realm_jax.train.checkpoints import TrainCheckpoints
from realm_jax.train.metrics import MetricsWriter, progress_line
from realm_jax.train.optim import make_optimizer
from realm_jax.train.state import state_shardings

_log = logging.getLogger(__name__)

MODEL_KEY = "rag"          # the RagConfig's name in WORKDIR/model.json
LOSSES = {"token": rag_token_nll, "sequence": rag_sequence_nll}
BACKENDS = ("scann", "exact")
DECODINGS = ("thorough", "fast")
BATCH_FIELDS = ("question_ids", "question_mask", "doc_embeddings", "context_ids",
                "context_mask", "decoder_input_ids", "labels")
# Where a Hugging Face RAG folder keeps its two tokenizers.
_TOKENIZER_SUBFOLDERS = {"question": "question_encoder_tokenizer",
                         "generator": "generator_tokenizer"}


def check_config(config: ml_collections.ConfigDict) -> None:
    """The choices of a RAG config, each error naming its field."""
    for field, value, allowed in (("rag.loss", config.rag.loss, tuple(LOSSES)),
                                  ("retrieval.backend", config.retrieval.backend, BACKENDS),
                                  ("eval.decoding", config.eval.decoding, DECODINGS)):
        if value not in allowed:
            raise ValueError(f"--config.{field}={value!r}: expected one of {', '.join(allowed)}")


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
        folder = config.data.get(field) or config.model.get(model_field)
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
        knobs = realm._knobs(section)
        key = (folder, tuple(sorted(knobs.items())))
        if key not in loaded:
            loaded[key] = hf.load(folder, **knobs)
        return loaded[key]

    base = None
    if not m.question_encoder_hf:
        section = dict(m.question_encoder.to_dict(), pad_token_id=tokenizers.question.pad_token_id)
        section["vocab_size"] = section["vocab_size"] or len(tokenizers.question)
        q_cfg = EmbedderConfig(EncoderConfig(**section), pooling="cls")
        q_params = realm._random_params(q_cfg, config.seed)
    elif _is_rag_folder(m.question_encoder_hf):
        base, params = load(m.question_encoder_hf, m.question_encoder)
        q_cfg, q_params = base.question_encoder, params["question_encoder"]
    else:
        q_cfg, q_params = hf.load_embedder(m.question_encoder_hf, **realm._knobs(m.question_encoder))
    if not m.generator_hf:
        section = dict(m.generator.to_dict(), **_generator_token_ids(tokenizers.generator))
        section["vocab_size"] = section["vocab_size"] or len(tokenizers.generator)
        g_cfg = BartConfig(**section)
        g_params = realm._random_params(g_cfg, config.seed + 1)
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
                             f"{'_hf' if m.get(what + '_hf') else '.vocab_size'}")
    if base is None:   # a BART checkpoint, or random: targets start with bos, end with eos
        base = RagConfig(q_cfg, g_cfg, forced_bos_token_id=g_cfg.bos_token_id,
                         forced_eos_token_id=g_cfg.eos_token_id)
    arch = "RagSequenceForGeneration" if rc.loss == "sequence" else "RagTokenForGeneration"
    cfg = base.replace(question_encoder=q_cfg, generator=g_cfg, n_docs=rc.n_docs,
                       max_combined_length=rc.max_combined_length, hf_architecture=arch)
    return cfg, {"question_encoder": q_params, "generator": g_params}


def make_rag_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The trainers' optimizer; the question encoder's updates scaled by
    `train.question_encoder_lr_multiplier` (its learning rate, weight decay included)."""
    return make_optimizer(train, {"question_encoder": train.get(
        "question_encoder_lr_multiplier", 1.0)})


# ---------------------------------------------------------------------------------------
# Data

def load_examples(config: ml_collections.ConfigDict, which: str) -> list:
    """The QA examples of config.data.<which> ("train" or "eval") and its split."""
    from realm_jax.data.qa import load_qa

    d = config.data
    if not d[which]:
        raise ValueError(f"set --config.data.{which} (a QA file: .jsonl, .json, .tsv; or "
                         "tfds:NAME)")
    return load_qa(d[which], split=d[f"{which}_split"], data_dir=d.data_dir or None)


def question_batches(num_examples: int, batch_size: int, seed: int, *, process_index: int = 0,
                     process_count: int = 1) -> grain.IterDataset:
    """Batches of example indices (this host's share of each global batch), in a seeded
    shuffled order repeated forever; the iterator's position is saved with checkpoints."""
    if batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} does not divide over {process_count} hosts")
    ds = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(None)
    ds = ds.to_iter_dataset().batch(batch_size)
    if process_count > 1:
        local = batch_size // process_count
        ds = ds.map(lambda b: b[process_index * local:(process_index + 1) * local])
    return ds


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
        self.embeddings = snapshot.embeddings()
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


def _local_rows(x: np.ndarray) -> np.ndarray:
    """This host's rows of a global batch (hosts hold consecutive equal slices)."""
    n = len(x) // jax.process_count()
    return x[jax.process_index() * n:(jax.process_index() + 1) * n]


# ---------------------------------------------------------------------------------------
# The loss

@dataclasses.dataclass(frozen=True)
class RagLossFn:
    """Mean RAG-Token / RAG-Sequence loss per question of a batch (BATCH_FIELDS), with
    dropout when given an rng; metrics: loss, nll (without label smoothing), top_doc_prob
    (the mean largest p(z|x))."""
    config: RagConfig
    loss: str = "token"
    label_smoothing: float = 0.0
    exclude_bos_score: bool = False

    def __call__(self, params, batch: dict, rng: jax.Array | None):
        out = self.config.module().apply(
            {"params": params}, batch["question_ids"], batch["question_mask"],
            batch["doc_embeddings"], batch["context_ids"], batch["context_mask"],
            batch["decoder_input_ids"], deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng})
        nll = functools.partial(LOSSES[self.loss], out.logits, batch["labels"], out.doc_scores,
                                pad_id=self.config.generator.pad_token_id,
                                exclude_bos_score=self.exclude_bos_score, reduce=False)
        loss = jnp.mean(nll(epsilon=self.label_smoothing))
        metrics = {"loss": loss,
                   "nll": jnp.mean(nll()) if self.label_smoothing else loss,
                   "top_doc_prob": jnp.exp(doc_log_probs(out.doc_scores).max(-1)).mean()}
        return loss, metrics


# ---------------------------------------------------------------------------------------
# Training

def _batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def _param_shardings(cfg: RagConfig, mesh, rules):
    return realm.param_shardings({MODEL_KEY: cfg}, mesh, rules)[MODEL_KEY]


@functools.lru_cache(maxsize=4)
def _training_step(loss_fn: RagLossFn, train_settings: tuple, mesh, rules):
    """(optimizer, state shardings, the jitted sharded step with the state donated), made
    once per (model and loss, `train` settings, mesh, rules) in a process: a run resumed in
    the same process (or the next test) does not trace the step again."""
    optimizer = make_rag_optimizer(ml_collections.ConfigDict(dict(train_settings)))
    cfg, replicated = loss_fn.config, sharding.replicated(mesh)
    shardings = state_shardings(optimizer, hf.abstract_params(cfg),
                                _param_shardings(cfg, mesh, rules), mesh)
    step = jax.jit(loop.train_step(loss_fn, optimizer),
                   in_shardings=(shardings, _batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    return optimizer, shardings, step


def _open_index(workdir: Path, store: BlockStore, wait_seconds: float = 0.0):
    """The newest valid snapshot of WORKDIR/index for `store`, waiting up to `wait_seconds`
    for the refresher to publish one."""
    index_dir = workdir / "index"
    watcher = SnapshotWatcher(IndexStore(index_dir), expected_corpus_fingerprint=store.fingerprint)
    if wait_seconds > 0:
        return loop.wait_for_snapshot(watcher, wait_seconds, index_dir)
    snapshot = watcher.poll()
    if snapshot is None:
        raise FileNotFoundError(f"no index of {store.path} in {index_dir}: build it with "
                                f"`realm-jax refresh --once --workdir {workdir} --config ...`")
    return snapshot


def _store(config) -> BlockStore:
    if not config.data.corpus:
        raise ValueError("set --config.data.corpus (a passage block store from `realm-jax "
                         "prepare-corpus --mode dpr`)")
    return BlockStore.open(config.data.corpus)


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          stop_after: int | None = None) -> dict[str, Any]:
    """Fine-tune until `config.train.steps` (resuming from WORKDIR's newest checkpoint).
    Returns a dict: "first" and "last" logged metrics, "final_state", "config" (RagConfig),
    "snapshot" (the index). `stop_after`: stop at that step with a checkpoint, unfinished."""
    check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc, rc = config.train, config.rag
    mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
    store = _store(config)
    examples = load_examples(config, "train")
    regex = [ex.qid for ex in examples if ex.is_regex]
    if regex:
        raise ValueError(f"--config.data.train={config.data.train}: {len(regex)} questions have "
                         "regular-expression answers (CuratedTrec); RAG trains on answer strings")
    tokenizers = load_tokenizers(config)
    cfg, host_params = build_model(config, tokenizers)
    checkpoints = TrainCheckpoints(workdir, max_to_keep=tc.keep_checkpoints,
                                   async_save=tc.async_checkpoints)
    checkpoints.write_model_configs({MODEL_KEY: cfg})
    loop.write_config(workdir, config)
    loss_fn = RagLossFn(cfg, rc.loss, rc.label_smoothing, rc.exclude_bos_score)
    optimizer, shardings, step_fn = _training_step(
        loss_fn, tuple(sorted(tc.to_dict().items())), mesh, rules)
    params_abstract = hf.abstract_params(cfg)
    batches = iter(question_batches(len(examples), tc.batch_size, config.seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count()))
    state, start = loop.restore_or_init(checkpoints, optimizer, shardings, params_abstract,
                                        host_params, batches, tc.steps)
    del host_params
    _log.info("%s %s at step %d", "resumed" if start else "started", workdir, start)

    snapshot = _open_index(workdir, store, tc.index_wait_seconds)
    retriever = Retriever(snapshot, store, cfg, tokenizers.generator,
                          config.retrieval.backend, config.retrieval.scann_threads)
    encoder = QAEncoder(tokenizers, cfg.generator, rc.max_source_length, rc.max_target_length)
    batch_sharding = _batch_sharding(mesh)
    rng = jax.random.key(config.seed)

    def fetch():   # in a thread: the next batch's examples, their questions tokenized
        chosen = [examples[int(i)] for i in next(batches)]
        return chosen, encoder.questions([ex.question for ex in chosen]), batches.get_state()

    def prepare(chosen: list, question_ids: np.ndarray, question_mask: np.ndarray, params
                ) -> tuple[dict, Retrieved]:
        """The global batch: the documents retrieved with the live question encoder, their
        contexts and the targets (the generator's tokenizer is used in this thread only)."""
        batch = loop.global_batch(dict(question_ids=question_ids, question_mask=question_mask),
                              batch_sharding)
        q = retriever.embed(params["question_encoder"], batch["question_ids"],
                            batch["question_mask"])
        found = retriever.search(_local_rows(q), rc.n_docs)
        ctx, ctx_mask = retriever.contexts(found.doc_ids, [ex.question for ex in chosen])
        dec, labels = encoder.targets([ex.answers[0] for ex in chosen])
        batch.update(loop.global_batch(dict(
            doc_embeddings=found.doc_embeddings, context_ids=ctx, context_mask=ctx_mask,
            decoder_input_ids=dec, labels=labels), batch_sharding))
        return batch, found

    end = loop.end_step(start, tc.steps, stop_after)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending = pool.submit(fetch)
    writer = MetricsWriter(workdir)
    flops = first = last = None
    step = start
    try:
        while step < end:
            chosen, (question_ids, question_mask), data_state = pending.result()
            pending = pool.submit(fetch)
            with sharding.activate(mesh, rules):
                t_host = time.perf_counter()
                batch, found = prepare(chosen, question_ids, question_mask, state.params)
                host_seconds = time.perf_counter() - t_host
                if flops is None:
                    flops = loop.step_flops(step_fn.lower(state, batch, rng).compile())
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch, rng)
                step += 1
                if step % tc.log_every == 0 or step in (start + 1, end):
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    seconds = time.perf_counter() - t0
                    values.update(
                        step_time=seconds, host_time=host_seconds,
                        answer_in_docs=_answer_in_docs(store, found.doc_ids, chosen),
                        mfu=flops / seconds / (tc.peak_flops_per_device * jax.device_count()))
                    if jax.process_index() == 0:
                        print(progress_line(step, tc.steps, {k: values[k] for k in (
                            "loss", "top_doc_prob", "answer_in_docs", "step_time")}), flush=True)
                    first = first or dict(values, step=step)
                    last = dict(values, step=step)
                    writer.write(step, values)
            if step % tc.checkpoint_every == 0 or step == end:
                loop.save(checkpoints, step, state, data_state, index=snapshot.version)
        loop.finish(checkpoints, step, tc.steps)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        writer.close()
        checkpoints.wait_until_finished()
    return {"first": first, "last": last, "final_state": state, "config": cfg,
            "snapshot": snapshot}


def _answer_in_docs(store: BlockStore, doc_ids: np.ndarray, examples: Sequence) -> float:
    """The fraction of questions with an answer in the text of a retrieved document."""
    from realm_jax.evaluate import has_answer

    return float(np.mean([any(has_answer(store.text(int(i)), ex.answers, regex=ex.is_regex)
                              for i in row if i >= 0) for row, ex in zip(doc_ids, examples)]))


# ---------------------------------------------------------------------------------------
# Evaluation and answering

@dataclasses.dataclass
class Answered:
    """Answers to a list of questions, and the documents retrieved for each (best first)."""
    answers: list[str]
    answer_scores: np.ndarray   # [Q] the decoder's score of each answer
    retrieved: Retrieved        # doc_ids / index_scores / doc_embeddings [Q, depth, ...]
    scores: np.ndarray          # [Q, depth] the question encoder's scores of the documents


class Reader:
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
        workdir = Path(workdir)
        checkpoints = TrainCheckpoints(workdir)
        configs = checkpoints.model_configs()
        if MODEL_KEY not in configs:
            raise ValueError(f"{workdir / 'model.json'}: no RAG model (parts: {sorted(configs)})")
        self.step = checkpoints.latest_step() if step is None else int(step)
        if self.step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
        ec, rc = config.eval, config.rag
        self.cfg = configs[MODEL_KEY]
        self.n_docs = ec.n_docs or self.cfg.n_docs
        self.depth = max([self.n_docs, *ec.recall_at])
        self.batch_size = ec.batch_size
        self.mesh, self.rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
        self.batch_sharding = _batch_sharding(self.mesh)
        p_shardings = _param_shardings(self.cfg, self.mesh, self.rules)
        self.params = {part: checkpoints.restore_part(self.step, part, p_shardings[part])
                       for part in p_shardings}
        self.store = _store(config)
        self.tokenizers = load_tokenizers(config)
        snapshot = _open_index(workdir, self.store)
        self.retriever = Retriever(snapshot, self.store, self.cfg, self.tokenizers.generator,
                                   config.retrieval.backend, config.retrieval.scann_threads)
        self.encoder = QAEncoder(self.tokenizers, self.cfg.generator, rc.max_source_length,
                                 rc.max_target_length)
        from realm_jax import decode
        gen = decode.GenerationConfig.from_rag(
            self.cfg, num_beams=ec.num_beams, min_length=ec.min_length,
            max_length=ec.max_length or rc.max_target_length + 1,
            length_penalty=ec.length_penalty)
        reader_cfg = self.cfg.replace(n_docs=self.n_docs)
        if rc.loss == "sequence":
            self._decode = functools.partial(decode.rag_sequence_generate, config=reader_cfg,
                                             gen=gen, fast=ec.decoding == "fast")
        else:
            self._decode = functools.partial(decode.rag_token_generate, config=reader_cfg,
                                             gen=gen)

    def __call__(self, questions: Sequence[str]) -> Answered:
        """Answers in batches of eval.batch_size (the last one padded)."""
        if not questions:
            raise ValueError("no questions to answer")
        texts, parts = [], []
        for i in range(0, len(questions), self.batch_size):
            chunk = list(questions[i:i + self.batch_size])
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            answers, arrays = self._answer(padded)
            texts += answers[:len(chunk)]
            parts.append(jax.tree.map(lambda x, n=len(chunk): x[:n], arrays))
        return Answered(texts, *jax.tree.map(lambda *xs: np.concatenate(xs), *parts))

    def _answer(self, questions: list[str]) -> tuple[list[str], tuple]:
        """Answers, and (their scores, the documents retrieved, the documents' scores)."""
        put = lambda x: loop.global_batch({"x": x}, self.batch_sharding)["x"]  # noqa: E731
        with sharding.activate(self.mesh, self.rules):
            ids, mask = self.encoder.questions(questions)
            q = self.retriever.embed(self.params["question_encoder"], put(ids), put(mask))
            found = self.retriever.search(q, self.depth)
            scores = np.einsum("bp,bkp->bk", q, found.doc_embeddings)
            ctx, ctx_mask = self.retriever.contexts(found.doc_ids[:, :self.n_docs], questions)
            out = self._decode(self.params, put(ctx), put(ctx_mask),
                               put(scores[:, :self.n_docs].astype(np.float32)))
            sequences, answer_scores = (np.asarray(x) for x in multihost_utils.process_allgather(
                (out.sequences[:, 0], out.scores[:, 0]), tiled=True))
        texts = self.tokenizers.generator.batch_decode(sequences, skip_special_tokens=True)
        return [t.strip() for t in texts], (answer_scores, found, scores)


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, examples=None,
             step: int | None = None, out: str | Path | None = None,
             reader: Reader | None = None) -> dict[str, Any]:
    """Exact match of the generated answers (normalized) and recall@k (`eval.recall_at`) of
    the retrieved passages on `examples` (default: config.data.eval, its first
    eval.num_questions). Writes the predictions as JSONL to `out` (default
    WORKDIR/eval/predictions.jsonl). Returns summarize()'s figures with "step" and
    "predictions" (the path)."""
    from realm_jax import evaluate as ev

    reader = reader or Reader(config, workdir, step=step)
    if examples is None:
        examples = load_examples(config, "eval")
        if config.eval.num_questions:
            examples = examples[:config.eval.num_questions]
    answered = reader([ex.question for ex in examples])
    store, found = reader.store, answered.retrieved
    predictions = []
    for i, ex in enumerate(examples):
        ids = [int(d) for d in found.doc_ids[i] if d >= 0]
        predictions.append(ev.Prediction.from_retrieval(
            ex, answered.answers[i], ids=ids, titles=[store.title(d) for d in ids],
            texts=[store.text(d) for d in ids], scores=answered.scores[i][:len(ids)].tolist()))
    out = Path(out) if out else Path(workdir) / "eval" / "predictions.jsonl"
    if jax.process_index() == 0:
        ev.write_predictions(out, predictions)
    return dict(ev.summarize(predictions, config.eval.recall_at), step=reader.step,
                predictions=str(out))


def predict(config: ml_collections.ConfigDict, workdir: str | Path, questions: Sequence[str],
            *, step: int | None = None, reader: Reader | None = None) -> list[dict]:
    """Answers to `questions`: for each {"question", "answer", "score" (the decoder's),
    "passages": [{"id", "title", "text", "score"}, ...]} with the eval.n_docs passages read,
    best first."""
    reader = reader or Reader(config, workdir, step=step)
    answered = reader(list(questions))
    store, found = reader.store, answered.retrieved
    return [{"question": question, "answer": answer, "score": float(answered.answer_scores[i]),
             "passages": [{"id": int(d), "title": store.title(int(d)), "text": store.text(int(d)),
                           "score": float(s)}
                          for d, s in zip(found.doc_ids[i, :reader.n_docs],
                                          answered.scores[i, :reader.n_docs]) if d >= 0]}
            for i, (question, answer) in enumerate(zip(questions, answered.answers))]
