"""REALM pre-training: the three models, the input pipeline, retrieval (on the devices or
from ScaNN on the host), the jitted loss, and the task the Trainer runs.

    realm-jax refresh --config configs/realm.py:tiny --workdir W --from_hf DIR &
    realm-jax train --config configs/realm.py:tiny --workdir W

The model is three parts, each a pure linen module with its own params:
  query_tower (Embedder), doc_tower (Embedder), reader (MaskedLM, the knowledge-augmented
  encoder). The stale index only decides which blocks are looked at: inside the step the
  candidates are re-embedded with the live document tower and scored with the live query
  tower, so gradients reach both towers and the reader.
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from realm_jax import config as config_lib
from realm_jax import hf, sharding
from realm_jax.data.pipeline import check_batch_split, host_share
from realm_jax.data.realm_examples import (CANDIDATE_FIELDS, QUERY_FIELDS, MaskedQuery,
                                          QueryMaker, SpecialIds, candidate_tokens,
                                          collate_queries)
from realm_jax.data.store import BlockStore
from realm_jax.index.device import device_topk
from realm_jax.models import EmbedderConfig, MaskedLMConfig, random_params
from realm_jax.objectives.realm import (RealmLoss, exclude_source, reader_inputs,
                                        realm_loss_from_logits)
from realm_jax.tasks import heldout
from realm_jax.tasks.base import Hook, Task, register
from realm_jax.tasks.common import IndexTask, apply_model, jit_apply, open_corpus, tower_config
from realm_jax.workdir import HELDOUT_BASELINE, Workdir

_log = logging.getLogger(__name__)

PARTS = ("query_tower", "doc_tower", "reader")
# retrieval.exclude: which retrieved blocks a query may not read. "block": the block its
# sentence came from (REALM's trivial candidate; the reference example generator drops that
# one candidate), "document": every block of its source document.
EXCLUDE_MODES = ("block", "document")


# ---------------------------------------------------------------------------------------
# Models

def build_models(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(configs, host params) of the three parts, from `config.model`:

    - `init_from_hf`: one BERT-layout folder (e.g. MiniLM) for all three parts: towers with
      the folder's pooling, the reader's MLM head newly initialised;
    - `query_tower_hf` / `doc_tower_hf` / `reader_hf`: per-part folders (REALM's embedder
      and knowledge-augmented encoder checkpoints); they take precedence;
    - otherwise random weights of the sizes in `model.encoder`.
    """
    m = config.model
    seed = config.seed
    knobs = config_lib.model_knobs(m.encoder)
    configs, params = {}, {}
    if m.init_from_hf:
        tower_cfg, tower_params = hf.load_embedder(m.init_from_hf, **knobs)
        for part in ("query_tower", "doc_tower"):
            configs[part], params[part] = tower_cfg, tower_params
        reader_cfg = MaskedLMConfig(tower_cfg.encoder.replace(add_pooler=False))
        reader_params = random_params(reader_cfg, seed + 2)
        reader_params["encoder"] = {k: v for k, v in tower_params["encoder"].items()
                                    if k != "pooler"}
        configs["reader"], params["reader"] = reader_cfg, reader_params
    else:
        configs = _sized_configs(m)
        for i, part in enumerate(PARTS):
            params[part] = random_params(configs[part], seed + i)
    for part in PARTS:
        folder = m[f"{part}_hf"]
        if folder:
            configs[part], params[part] = (hf.load_embedder(folder, **knobs) if part != "reader"
                                           else hf.load(folder, **knobs))
    return configs, params


def _sized_configs(m: ml_collections.ConfigDict) -> dict:
    """The parts' configs of the sizes in `model.encoder` (no HF folder)."""
    tower = tower_config(m)
    return {"query_tower": tower, "doc_tower": tower,
            "reader": MaskedLMConfig(tower.encoder.replace(add_pooler=False))}


def model_configs(config: ml_collections.ConfigDict) -> dict:
    """The parts' configs `build_models` gives, without making weights (only when HF
    folders are named are they read, weights included)."""
    m = config.model
    if m.init_from_hf or any(m[f"{part}_hf"] for part in PARTS):
        return build_models(config)[0]
    return _sized_configs(m)


def batch_shapes(batch_size: int, rc: ml_collections.ConfigDict) -> dict:
    """ShapeDtypeStructs of a global batch as the step receives it (`query_dataset`'s
    fields, with the candidates in `scann` mode; integers are int32 on the devices)."""
    b, q, m, k, c = (batch_size, rc.query_length, rc.max_mask_tokens, rc.num_candidates,
                     rc.block_length)
    i32, flag = np.dtype(np.int32), np.dtype(bool)
    shapes = {"input_ids": ((b, q), i32), "attention_mask": ((b, q), i32),
              "mask_positions": ((b, m), i32), "mask_targets": ((b, m), i32),
              "mask_valid": ((b, m), flag), "block_id": ((b,), i32), "doc_index": ((b,), i32)}
    if rc.mode == "scann":
        shapes.update(cand_ids=((b, k), i32), cand_valid=((b, k), flag),
                      cand_tokens=((b, k, c), i32), cand_lengths=((b, k), i32))
    return {name: jax.ShapeDtypeStruct(*shapes[name])
            for name in QUERY_FIELDS + (CANDIDATE_FIELDS if rc.mode == "scann" else ())}


# ---------------------------------------------------------------------------------------
# Input pipeline

def query_dataset(store: BlockStore, maker: QueryMaker, batch_size: int, seed: int,
                  *, block_ids: np.ndarray | None = None, keep=None, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """Batches of masked queries: blocks (`block_ids`, default all; the trainer passes the
    training blocks, see `heldout.split_blocks`) in a seeded shuffled order (repeated
    forever), one query per block drawn with a per-element seed (among those `keep(query)`
    accepts, when given; a block with none is skipped), this host's share of every global
    batch. The iterator's position (`get_state`) is saved with each checkpoint."""
    check_batch_split(batch_size, process_count)

    def pick(block_id, rng: np.random.Generator):
        queries = maker.from_block(store, int(block_id), seed=int(rng.integers(2**31)))
        if keep is not None:
            queries = [q for q in queries if keep(q)]
        return queries[int(rng.integers(len(queries)))] if queries else None

    if block_ids is None:
        ds = grain.MapDataset.range(len(store))
    else:
        block_ids = np.asarray(block_ids, np.int64)
        if not len(block_ids):
            raise ValueError("query_dataset: no blocks to draw queries from")
        ds = grain.MapDataset.source(block_ids)
    maker.require_queries(store, block_ids, seed)  # else the endless pipeline spins forever
    # With no query to keep anywhere, the endless pipeline would search forever. The check
    # draws each block's queries with `seed` only (a sentence with several salient spans
    # masks one of them per seed), so it speaks of those draws.
    if keep is not None and not any(keep(q) for i in range(len(ds))
                                    for q in maker.from_block(store, int(ds[i]), seed=seed)):
        raise ValueError(f"data.answerable_only: no query drawn (seed {seed}) from the training "
                         f"blocks of {store.path} has its masked span in a block it may read")
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.random_map(pick, seed=seed).to_iter_dataset()
    return host_share(ds.batch(batch_size, batch_fn=collate_queries), process_index,
                      process_count)


# ---------------------------------------------------------------------------------------
# Retrieval

@dataclasses.dataclass
class DeviceCorpus:
    """What the `device` retrieval mode keeps on the devices: the snapshot's embeddings and
    the blocks' tokens, lengths and documents, all sharded along the corpus axis."""
    embeddings: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    doc_index: jax.Array
    num_valid: int
    block_size: int

    def arrays(self) -> dict:
        return {"embeddings": self.embeddings, "tokens": self.tokens, "lengths": self.lengths,
                "doc_index": self.doc_index}


def device_corpus(snapshot, store: BlockStore, block_length: int, mesh, block_size: int = 4096
                  ) -> DeviceCorpus:
    """`snapshot`'s embeddings and the tokens of `store` (the version the snapshot was built
    from) on the devices, a row per block id: the removed blocks of an updated corpus are
    zero rows with doc_index -1, which the search masks out (`corpus_row_valid`)."""
    from realm_jax.index.device import DeviceSearcher

    if not np.array_equal(snapshot.ids(), store.live_ids()):
        raise ValueError(f"index {snapshot.path}: its block ids are not the live blocks of "
                         f"version {store.version} of block store {store.root} (read the "
                         "store through Workdir.snapshot_store)")
    n = len(store)
    embeddings = snapshot.block_embeddings(n)
    rows = corpus_rows(n)
    if rows > n:  # room for updates: zero rows with doc_index -1, never returned
        embeddings = np.concatenate([embeddings, np.zeros((rows - n, embeddings.shape[1]),
                                                          embeddings.dtype)])
    searcher = DeviceSearcher(embeddings, mesh=mesh, block_size=block_size)
    shapes = device_corpus_shapes(n, searcher.dim, snapshot.dtype, block_length, mesh,
                                  block_size)
    tokens, lengths = store.tokens_batch(np.arange(n), max_length=block_length)
    pad = searcher.embeddings.shape[0] - n
    tokens = np.pad(tokens, ((0, pad), (0, 0)))
    lengths = np.pad(lengths.astype(np.int32), (0, pad))
    docs = np.pad(np.asarray(store.doc_index, np.int32), (0, pad), constant_values=-1)
    put = lambda x, name: jax.device_put(x, shapes[name].sharding)  # noqa: E731
    return DeviceCorpus(searcher.embeddings, put(tokens.astype(np.int32), "tokens"),
                        put(lengths, "lengths"), put(docs, "doc_index"), n,
                        searcher.block_size)


def corpus_rows(num_blocks: int) -> int:
    """Rows a device corpus of `num_blocks` blocks is laid out on: rounded up to a
    multiple of a sixteenth of its power of two (at most 1/16 more), so that a corpus update
    that adds a few blocks keeps the shapes, and the compiled step, of the version before."""
    step = 1 << max(0, max(1, int(num_blocks)).bit_length() - 5)
    return -(-int(num_blocks) // step) * step


def corpus_row_valid(corpus: dict) -> jax.Array | None:
    """Which rows of a device corpus hold a block ([N] bool: not padding, not removed), or
    None for a corpus without `doc_index` (every row below num_valid is a block)."""
    docs = corpus.get("doc_index")
    return None if docs is None else docs >= 0


def device_corpus_shapes(num_rows: int, dim: int, dtype: str, block_length: int, mesh,
                         block_size: int = 4096) -> dict:
    """ShapeDtypeStructs, with their shardings, of `device_corpus(...).arrays()` for a
    corpus of `num_rows` blocks and `dim`-wide embeddings stored as `dtype`."""
    from realm_jax.index.device import corpus_sharding, padded_rows
    from realm_jax.index.embed_corpus import numpy_dtype

    rows = corpus_sharding(mesh)
    padded, _ = padded_rows(corpus_rows(num_rows), mesh, block_size)
    spec = lambda ndim: jax.sharding.NamedSharding(  # noqa: E731
        mesh, jax.sharding.PartitionSpec(rows.spec[0], *([None] * (ndim - 1))))
    i32 = np.dtype(np.int32)
    return {"embeddings": jax.ShapeDtypeStruct((padded, dim), numpy_dtype(dtype), sharding=rows),
            "tokens": jax.ShapeDtypeStruct((padded, block_length), i32, sharding=spec(2)),
            "lengths": jax.ShapeDtypeStruct((padded,), i32, sharding=spec(1)),
            "doc_index": jax.ShapeDtypeStruct((padded,), i32, sharding=spec(1))}


def gather_blocks(corpus: dict, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens [..., C] and lengths [...] of the device corpus's `rows` (< 0: empty, length 0)."""
    safe = jnp.maximum(rows, 0)
    return (jnp.take(corpus["tokens"], safe, axis=0),
            jnp.where(rows >= 0, jnp.take(corpus["lengths"], safe, axis=0), 0))


def check_exclude(exclude: str) -> str:
    """`exclude` if it is one of EXCLUDE_MODES, else a ValueError naming the config field."""
    if exclude not in EXCLUDE_MODES:
        raise ValueError(f"retrieval.exclude must be one of {EXCLUDE_MODES}, got {exclude!r}")
    return exclude


def exclusion_keys(exclude: str, rows, row_docs, batch: dict):
    """(keys of the retrieved rows [B, R], key of each query's source [B]) for
    `exclude_source`: block ids, or (`exclude="document"`) source-document ordinals, where
    `row_docs` maps a retrieved row to its document (rows < 0, empty slots, stay < 0).
    numpy or jax, like `rows`."""
    if check_exclude(exclude) == "block":
        return rows, batch["block_id"].astype(rows.dtype)
    xp = np if isinstance(rows, np.ndarray) else jnp
    docs = xp.where(rows >= 0, xp.take(row_docs, xp.maximum(rows, 0), axis=0), -1)
    return docs.astype(rows.dtype), batch["doc_index"].astype(rows.dtype)


class AnswerFinder:
    """Whether a query's answer is in the corpus where retrieval could hand it over:
    `finder(query)` is True when the query's masked wordpieces occur, whole and in order, in
    a block of `store` the query may read (not its own block; with `exclude="document"`,
    not its own document). On a corpus as small as the Wikipedia sample many masked spans
    occur nowhere else, and those queries cannot gain from retrieval.

    The corpus is held as one string, a character per token, so up to MAX_TOKENS tokens."""

    MAX_TOKENS = 50_000_000

    def __init__(self, store: BlockStore, exclude: str = "block"):
        self.exclude = check_exclude(exclude)
        if not self.fits(store):
            raise ValueError(f"data.answerable_only: block store {store.path} holds "
                             f"{int(np.sum(store.lengths)):,} tokens, more than the "
                             f"{self.MAX_TOKENS:,} searched for answers")
        # Token t is the character t + 1 and "\0" ends each block, so str.find matches whole
        # tokens and never runs across two blocks.
        blocks = ["".join(map(chr, store.tokens(i).astype(np.int64) + 1)) + "\0"
                  for i in range(len(store))]
        self._corpus = "".join(blocks)
        self._starts = np.cumsum([0] + [len(b) for b in blocks])
        self._docs = np.asarray(store.doc_index, np.int64)

    @classmethod
    def fits(cls, store: BlockStore) -> bool:
        return int(np.sum(store.lengths, dtype=np.int64)) <= cls.MAX_TOKENS

    def __call__(self, query: MaskedQuery) -> bool:
        needle = self._needle(query)
        at = self._corpus.find(needle) if needle else -1
        while at >= 0:
            block = int(np.searchsorted(self._starts, at, side="right")) - 1
            if self._readable(query, block):
                return True
            at = self._corpus.find(needle, at + 1)
        return False

    def in_blocks(self, query: MaskedQuery, block_ids) -> bool:
        """Whether the query's masked wordpieces occur, whole and in order, in one of the
        blocks `block_ids` that it may read (negative ids, the null document and empty
        candidate slots, are skipped): whether its candidates hand it the answer."""
        needle = self._needle(query)
        return bool(needle) and any(
            needle in self._corpus[self._starts[b]:self._starts[b + 1]]
            for b in map(int, block_ids) if b >= 0 and self._readable(query, b))

    @staticmethod
    def _needle(query: MaskedQuery) -> str:
        return "".join(chr(int(t) + 1) for t in query.mask_targets[query.mask_valid])

    def _readable(self, query: MaskedQuery, block: int) -> bool:
        return (block != query.block_id if self.exclude == "block"
                else self._docs[block] != query.doc_index)


class HostRetriever:
    """The `scann` retrieval mode: queries embedded by the query tower of the snapshot's own
    checkpoint, searched with the snapshot's ScaNN index on the host, the candidates' tokens
    attached to the batch (runs in the input pipeline, overlapping the step)."""

    def __init__(self, snapshot, query_cfg: EmbedderConfig, query_params, store: BlockStore,
                 num_candidates: int, exclude_slack: int, block_length: int, num_threads: int = 0,
                 exclude: str = "block"):
        self.snapshot = snapshot
        self.searcher = snapshot.scann_searcher(num_threads)
        self.params = jax.device_put(query_params)
        self.query_cfg = query_cfg
        self.store = store
        self.k = num_candidates
        self.depth = num_candidates - 1 + exclude_slack
        self.block_length = block_length
        self.doc_index = np.asarray(store.doc_index)
        self.exclude = check_exclude(exclude)

    @classmethod
    def from_config(cls, rc: ml_collections.ConfigDict, snapshot, query_cfg: EmbedderConfig,
                    query_params, store: BlockStore) -> "HostRetriever":
        """The retriever the `retrieval` config section `rc` describes."""
        return cls(snapshot, query_cfg, query_params, store, rc.num_candidates,
                   rc.exclude_slack, rc.block_length, rc.scann_threads, rc.exclude)

    def __call__(self, batch: dict) -> dict:
        queries = np.asarray(jit_apply(self.query_cfg, self.params, batch["input_ids"],
                                       batch["attention_mask"]))
        _, ids = self.searcher.search(queries, min(self.depth, self.searcher.size))
        cand, valid = exclude_source(
            ids, *exclusion_keys(self.exclude, ids, self.doc_index, batch), self.k)
        tokens, lengths = candidate_tokens(self.store, cand, max_length=self.block_length)
        return dict(batch, cand_ids=cand, cand_valid=valid, cand_tokens=tokens,
                    cand_lengths=lengths)


# ---------------------------------------------------------------------------------------
# The loss

def doc_tower_inputs(tokens: jax.Array, lengths: jax.Array, special: SpecialIds):
    """`[CLS] block [SEP]` rows (the null document: `[CLS] [SEP]`) from stored block tokens
    [..., C] and their lengths [...]; returns ids and attention mask [..., C + 2]."""
    c = tokens.shape[-1]
    t = jnp.arange(c + 2)
    n = lengths[..., None]
    source = jnp.broadcast_to(jnp.clip(t - 1, 0, c - 1), tokens.shape[:-1] + (c + 2,))
    body = jnp.take_along_axis(tokens, source, axis=-1)
    ids = jnp.where(t == 0, special.cls,
                    jnp.where(t <= n, body, jnp.where(t == n + 1, special.sep, special.pad)))
    return ids.astype(jnp.int32), (t <= n + 1).astype(jnp.int32)


def loss_metrics(out: RealmLoss) -> dict:
    """The logged metrics of a step's (or an evaluation's) loss."""
    return {"loss": out.loss, "retrieval_utility": out.retrieval_utility,
            "masked_tokens": out.num_tokens,
            "top_candidate_prob": jnp.exp(out.retrieval_log_probs.max(-1)).mean(),
            "null_prob": jnp.exp(out.retrieval_log_probs[:, 0]).mean()}


@dataclasses.dataclass(frozen=True)
class RealmLossFn:
    configs: dict
    special: SpecialIds
    num_candidates: int
    exclude_slack: int
    score_scale: float
    mode: str                       # "device" or "scann"
    num_valid: int = 0              # device mode: corpus rows that are real (0: by doc_index)
    block_size: int = 4096
    exclude: str = "block"          # retrieval.exclude (EXCLUDE_MODES)

    def __post_init__(self):
        check_exclude(self.exclude)

    @classmethod
    def from_config(cls, rc: ml_collections.ConfigDict, configs: dict, special: SpecialIds,
                    mode: str | None = None, num_valid: int = 0) -> "RealmLossFn":
        """The loss the `retrieval` config section `rc` describes (`mode` overrides
        rc.mode; `num_valid`: the corpus rows, for device mode; 0: the rows doc_index marks
        as blocks, which follow whatever corpus version is served)."""
        return cls(configs, special, rc.num_candidates, rc.exclude_slack, rc.score_scale,
                   mode or rc.mode, num_valid=num_valid, block_size=rc.search_block_size,
                   exclude=rc.exclude)

    def device_candidates(self, params, batch, corpus) -> dict:
        """Embed the queries with the live tower, search the sharded corpus, drop the
        query's source (`exclude`), gather the candidates' tokens."""
        q = apply_model(self.configs["query_tower"], params["query_tower"], batch["input_ids"],
                        batch["attention_mask"])
        depth = min(self.num_candidates - 1 + self.exclude_slack,
                    self.num_valid or corpus["embeddings"].shape[0])
        _, rows = device_topk(jax.lax.stop_gradient(q), corpus["embeddings"], depth,
                              block_size=self.block_size, num_valid=self.num_valid or None,
                              row_valid=corpus_row_valid(corpus))
        cand, valid = exclude_source(
            rows, *exclusion_keys(self.exclude, rows, corpus["doc_index"], batch),
            self.num_candidates)
        tokens, lengths = gather_blocks(corpus, cand)
        return dict(cand_ids=cand, cand_valid=valid, cand_tokens=tokens, cand_lengths=lengths)

    def forward(self, params, batch: dict, rng: jax.Array | None):
        """Relevance scores [B, K] of the candidates in `batch` (live towers) and the reader's
        MLM logits at the masked positions [B, K, M, V]; dropout on when `rng` is given."""
        rngs = dict(zip(PARTS, jax.random.split(rng, 3))) if rng is not None else {}

        def apply(part, *args):
            return apply_model(self.configs[part], params[part], *args, rng=rngs.get(part))

        q = apply("query_tower", batch["input_ids"], batch["attention_mask"])      # [B, P]
        tokens, lengths = batch["cand_tokens"], batch["cand_lengths"]              # [B, K, C]
        b, k, c = tokens.shape
        d_ids, d_mask = doc_tower_inputs(tokens.reshape(b * k, c), lengths.reshape(b * k),
                                         self.special)
        d = apply("doc_tower", d_ids, d_mask).reshape(b, k, -1)
        scores = jnp.einsum("bp,bkp->bk", q, d) * self.score_scale

        r = reader_inputs(batch["input_ids"], batch["attention_mask"], tokens, lengths,
                          sep_id=self.special.sep, pad_id=self.special.pad)
        t = r.input_ids.shape[-1]
        positions = jnp.repeat(batch["mask_positions"][:, None], k, axis=1).reshape(b * k, -1)
        mlm = apply("reader", r.input_ids.reshape(b * k, t), r.attention_mask.reshape(b * k, t),
                    r.token_type_ids.reshape(b * k, t), positions)
        return scores, mlm.reshape(b, k, *mlm.shape[1:])

    def with_candidates(self, params, batch: dict, corpus: dict | None) -> dict:
        if self.mode == "device":
            return dict(batch, **self.device_candidates(params, batch, corpus))
        return batch

    def scored(self, params, batch: dict, corpus: dict | None, rng: jax.Array | None
               ) -> tuple[RealmLoss, dict]:
        """(the loss with its per-token terms, the batch with its candidates)."""
        batch = self.with_candidates(params, batch, corpus)
        scores, mlm = self.forward(params, batch, rng)
        return realm_loss_from_logits(scores, mlm, batch["mask_targets"], batch["mask_valid"],
                                      batch["cand_valid"]), batch

    def __call__(self, params, batch: dict, corpus: dict | None, rng: jax.Array | None):
        """(loss, (metrics, candidate ids)); dropout on when `rng` is given (None: evaluation)."""
        out, batch = self.scored(params, batch, corpus, rng)
        return out.loss, (loss_metrics(out), batch["cand_ids"])

    def train_loss(self, params, batch: dict, corpus: dict | None, rng: jax.Array | None):
        """(loss, metrics): the task's loss."""
        loss, (metrics, _) = self(params, batch, corpus, rng)
        return loss, metrics

    def predict(self, params, batch: dict, corpus: dict | None, top_k: int = 5) -> dict:
        """The candidates, their retrieval probabilities [B, K], and for each masked
        position the `top_k` tokens of the marginal over candidates with their probabilities
        (`top_tokens`, `top_probs` [B, M, top_k], best first), without dropout."""
        batch = self.with_candidates(params, batch, corpus)
        scores, mlm = self.forward(params, batch, None)
        scores = jnp.where(batch["cand_valid"], scores, -jnp.inf)
        log_pz = jax.nn.log_softmax(scores, axis=-1)
        marginal = jax.nn.logsumexp(log_pz[:, :, None, None] + jax.nn.log_softmax(mlm, -1), axis=1)
        top_log_probs, top_tokens = jax.lax.top_k(marginal, top_k)
        return {"cand_ids": batch["cand_ids"], "retrieval_probs": jnp.exp(log_pz),
                "top_tokens": top_tokens, "top_probs": jnp.exp(top_log_probs)}


# ---------------------------------------------------------------------------------------
# The task

@register
class RealmTask(IndexTask):
    """REALM pre-training: masked queries from the block store, candidates from the newest
    index snapshot (searched on the devices with the live query tower, or with ScaNN on the
    host with the query tower of the snapshot's checkpoint), the marginal MLM loss over them;
    each newer snapshot swapped in (IndexTask); held-out evaluation as a hook."""

    name = "realm"
    progress_keys = ("loss", "retrieval_utility", "staleness", "step_time", "mfu")
    refreshes = True

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if config.retrieval.mode not in ("device", "scann"):
            raise ValueError(f"--config.retrieval.mode={config.retrieval.mode!r}: expected "
                             "'device' or 'scann'")
        self.snapshot = None
        self.evaluator = None

    def build(self) -> tuple[dict, dict]:
        return build_models(self.config)

    def model_configs(self) -> dict:
        return model_configs(self.config)

    def loss_fn(self, configs: dict, special: SpecialIds, num_valid: int = 0,
                mode: str | None = None) -> "RealmLossFn":
        return RealmLossFn.from_config(self.config.retrieval, configs, special, mode=mode,
                                       num_valid=num_valid)

    def dataset(self, run):
        c, rc = self.config, self.config.retrieval
        self.store = store = open_corpus(c, tokenizer=True)
        self.maker = QueryMaker.for_store(store, c.data.tokenizer, query_length=rc.query_length,
                                          max_mask_tokens=rc.max_mask_tokens)
        self.train_blocks, self.heldout_blocks = heldout.split_blocks(
            store, c.data.heldout_fraction)
        wants_eval = c.train.eval_queries > 0 and len(self.heldout_blocks)
        # Which queries retrieval could help: for data.answerable_only and the held-out
        # figures over those queries (skipped on a corpus too large to search).
        self.finder = (AnswerFinder(store, rc.exclude) if c.data.answerable_only or (
            wants_eval and AnswerFinder.fits(store)) else None)
        return query_dataset(store, self.maker, c.train.batch_size, c.seed,
                             block_ids=self.train_blocks,
                             keep=self.finder if c.data.answerable_only else None,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())

    def start(self, run) -> None:
        self.run = run
        # device mode: the corpus rows searched are those its doc_index marks as blocks, so
        # the one compiled step serves every store version a snapshot swap brings in
        self.loss_ = self.loss_fn(run.configs, self.maker.special)
        self.serve_first(run.workdir, run.workdir.index_watcher(self.store))
        _log.info("using index %s (checkpoint step %d)", self.snapshot.version,
                  self.snapshot.step)

    def serve(self, snapshot) -> None:
        """Serve `snapshot`: its corpus on the devices (device mode), or its ScaNN index and
        the query tower of its checkpoint (scann mode)."""
        run, rc = self.run, self.config.retrieval
        self.snapshot, self.corpus, self.retriever = snapshot, None, None
        # candidates' tokens come from the store version the snapshot was built from
        store = run.workdir.snapshot_store(snapshot, self.store)
        if store is not self.store and self.finder is not None:
            # the held-out figures look the answers up in the blocks candidates come from
            self.finder = AnswerFinder(store, rc.exclude)
            if self.evaluator is not None:
                self.evaluator.finder = self.finder
        self.store = store
        if rc.mode == "device":
            with sharding.activate(run.mesh, run.rules):
                self.corpus = device_corpus(snapshot, self.store, rc.block_length, run.mesh,
                                            self.loss_.block_size)
            return
        run.checkpoints.pin(snapshot.step)  # its query tower embeds the queries, on resume too
        if snapshot.step in run.checkpoints.all_steps():
            query_params = run.checkpoints.restore_part(snapshot.step, "query_tower")
        else:  # an index from pretrained weights, or its checkpoint was lost
            _log.warning("checkpoint %d of snapshot %s is gone: embedding queries with the "
                         "live query tower", snapshot.step, snapshot.version)
            query_params = jax.device_get(run.params()["query_tower"])
        self.retriever = HostRetriever.from_config(rc, snapshot, run.configs["query_tower"],
                                                   query_params, self.store)

    def make_batch(self, item, params):
        if self.retriever is not None:
            item = self.retriever(item)
        fields = QUERY_FIELDS + (CANDIDATE_FIELDS if self.retriever is not None else ())
        return sharding.global_batch({k: item[k] for k in fields}, self.run.batch_sharding), None

    def loss(self, params, batch, extras, rng):
        return self.loss_.train_loss(params, batch, extras, rng)

    def extras(self):
        return None if self.corpus is None else self.corpus.arrays()

    def tokens_per_step(self) -> int:
        rc = self.config.retrieval
        return (self.config.train.batch_size * rc.num_candidates
                * (rc.query_length + rc.block_length))

    def hooks(self, run) -> list[Hook]:
        tc = self.config.train
        queries = []
        if tc.eval_queries > 0 and len(self.heldout_blocks):
            queries = heldout.heldout_queries(self.store, self.maker, self.heldout_blocks,
                                              tc.eval_queries, self.config.seed)
        if not queries:
            _log.info("no held-out evaluation (data.heldout_fraction=%s, train.eval_queries=%d,"
                      " %d held-out blocks)", self.config.data.heldout_fraction,
                      tc.eval_queries, len(self.heldout_blocks))
            return []
        evaluator = heldout.HeldoutEval(
            self.loss_, queries, mesh=run.mesh, param_shardings=run.param_shardings,
            corpus_shardings=jax.tree.map(lambda x: x.sharding, self.extras()),
            baseline_file=run.workdir.path(HELDOUT_BASELINE), resume=run.resuming,
            finder=self.finder, batch_size=tc.eval_batch_size)
        self.evaluator = evaluator
        _log.info("held-out evaluation: %d masked queries from %d held-out blocks (%s "
                  "answerable)", len(queries), len(self.heldout_blocks),
                  "?" if self.finder is None else evaluator.answerable.sum())

        def evaluate(step: int, params) -> dict:
            values = evaluator(params, self.extras(), self.retriever, step=step)
            return dict(values, index_step=float(self.snapshot.step))

        return [Hook("eval", evaluate, every=tc.eval_every, shown=(
            "heldout_loss", "heldout_retrieval_utility", "heldout_retrieval_utility_change",
            "heldout_retrieval_utility_change_se", "heldout_answerable_retrieval_utility",
            "heldout_answerable_retrieval_utility_change", "heldout_answer_recall"))]

    @staticmethod
    def summary(result: dict) -> str | None:
        return Task.summary(result, ("loss", "retrieval_utility"))


def predict_examples(config: ml_collections.ConfigDict, workdir, params, num: int = 4,
                     seed: int = 1, top_k: int = 5) -> list[dict]:
    """`num` masked sentences of the corpus (drawn with another seed), the blocks the newest
    index and `params` retrieve for them, and the reader's `top_k` tokens with their
    probabilities at each masked wordpiece: for showing a run. Each dict: "sentence",
    "masked" (the span), "targets" (its wordpieces), "top" ([(token, probability)] per
    wordpiece), "retrieved" ([(title, retrieval probability)], the null document first)."""
    rc = config.retrieval
    run = Workdir(workdir)
    store = BlockStore.open(config.data.corpus)
    maker = QueryMaker.for_store(store, config.data.tokenizer, query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    configs = run.read_model()
    snapshot = run.wait_for_snapshot(run.index_watcher(store), 0)
    store = run.snapshot_store(snapshot, store)
    params = jax.device_get(params)
    retriever = HostRetriever.from_config(rc, snapshot, configs["query_tower"],
                                          params["query_tower"], store)
    loss_fn = RealmLossFn.from_config(rc, configs, maker.special, mode="scann")
    order = np.random.default_rng(seed).permutation(len(store))
    queries = [q for q, _ in zip(maker.iter_store(store, order, seed=seed), range(num))]
    batch = retriever(collate_queries(queries))
    fields = QUERY_FIELDS + CANDIDATE_FIELDS
    predict = jax.jit(loss_fn.predict, static_argnums=3)
    out = jax.device_get(predict(params, {k: batch[k] for k in fields}, None, top_k))
    vocab = maker.tokenizer.backend
    rows = []
    for i, q in enumerate(queries):
        valid = np.flatnonzero(q.mask_valid)
        rows.append({
            "sentence": q.sentence, "masked": q.span_text,
            "targets": [vocab.id_to_token(int(t)) for t in q.mask_targets[valid]],
            "top": [[(vocab.id_to_token(int(t)), float(p))
                     for t, p in zip(out["top_tokens"][i, m], out["top_probs"][i, m])]
                    for m in valid],
            "retrieved": [(store.title(int(c)) if c >= 0 else "(null document)", float(p))
                          for c, p in zip(out["cand_ids"][i], out["retrieval_probs"][i])],
        })
    return rows
