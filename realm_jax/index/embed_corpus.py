"""Embedding a whole corpus block store with a document tower, in shards.

Rows are built from the store's tokens (stored without special tokens) as the tower
expects: ``[CLS] title [SEP] text [SEP]`` (DPR passages; REALM blocks when titles are on)
or ``[CLS] text [SEP]``, with the tokenizer's own [CLS]/[SEP] ids. Batches are length
bucketed (`realm_jax.embedding.bucket_length`) and sharded along the batch over the data
axes of a mesh of all local devices.

Worker ``i`` of ``n`` embeds the contiguous block-id slice `worker_range(N, i, n)`, written
as one shard (or several of at most ``shard_size`` blocks) into a folder::

    shard-0000000000-0000004467.npy    [count, P] float16 / float32 (bfloat16 as raw uint16)
    shard-0000000000-0000004467.json   the ids it covers, dim, dtype, fingerprints (last)

Both files are written under ``.tmp-*`` names and renamed into place, the json last: a
shard exists only once complete. A rerun removes its own leftovers and reuses its complete
shards (same model and corpus), so a killed run resumes. `merge_shards` assembles the
[N, P] matrix and checks that every id is covered exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from realm_jax import sharding
from realm_jax.data.blocks import TokenizerInfo, load_tokenizer, tokenizer_info
from realm_jax.data.store import BlockStore
from realm_jax.durable import TMP_PREFIX, atomic_write, fsync_dir
from realm_jax.embedding import embed_rows, tower_forward
from realm_jax.index.store import (check_npy, from_storage, numpy_dtype, storage_dtype,
                                   to_storage)
from realm_jax.models import config_to_dict
from realm_jax.models.towers import EmbedderConfig

_log = logging.getLogger(__name__)

SHARD_FORMAT = "realm_jax.embedding_shard"
SHARD_VERSION = 1
_SHARD_RE = re.compile(r"^shard-(\d{10})-(\d{10})\.json$")


def worker_range(count: int, worker: int, num_workers: int) -> tuple[int, int]:
    """The contiguous block ids [start, end) that `worker` of `num_workers` embeds."""
    if num_workers < 1:
        raise ValueError(f"--num_workers must be >= 1, got {num_workers}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"--worker must be in [0, {num_workers}), got {worker}")
    return count * worker // num_workers, count * (worker + 1) // num_workers


def tree_digest(tree: Any, digest=None):
    """`digest` (a new sha256 by default) updated with every leaf's path, dtype, shape and
    bytes, in path order."""
    digest = digest or hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest


def params_fingerprint(config: EmbedderConfig, params: Any) -> str:
    """sha256 over a tower's config and every parameter's path, dtype, shape and bytes."""
    return tree_digest(params, hashlib.sha256(
        json.dumps(config_to_dict(config), sort_keys=True).encode())).hexdigest()


# ---------------------------------------------------------------------------------------
# Rows: the model's input for each block


def _load_tokenizer(tokenizer: str | os.PathLike | TokenizerInfo) -> TokenizerInfo:
    """`realm_jax.data.load_tokenizer`, straight from tokenizer.json when the folder has one
    (seconds faster than importing transformers; the same vocab hash)."""
    if isinstance(tokenizer, TokenizerInfo):
        return tokenizer
    path = Path(tokenizer) / "tokenizer.json"
    if not path.is_file():
        return load_tokenizer(tokenizer)
    import tokenizers

    return tokenizer_info(tokenizers.Tokenizer.from_file(os.fspath(path)), Path(tokenizer).name)


# `refresh.title`'s values: titles joined to the text or not ("auto": for DPR passages).
TITLE_CHOICES = {"auto": None, "yes": True, "no": False}


@dataclasses.dataclass
class RowBuilder:
    """Builds model rows for blocks of a store: ``[CLS] title [SEP] text [SEP]`` with
    titles, else ``[CLS] text [SEP]``; rows longer than ``max_length`` lose the end of the
    text (a title keeps at most ``max_length // 2`` tokens)."""

    store: BlockStore
    cls_id: int
    sep_id: int
    with_title: bool
    max_length: int
    tokenizer: TokenizerInfo | None = None

    @classmethod
    def for_store(cls, store: BlockStore, tokenizer: str | os.PathLike | TokenizerInfo, *,
                  title: bool | None = None, max_length: int = 512) -> "RowBuilder":
        """Rows for `store` with `tokenizer` (the local HF folder the store was tokenized
        with; checked against the store). `title=None`: titles for DPR passages, not for
        REALM blocks."""
        info = _load_tokenizer(tokenizer)
        store.check_tokenizer(tokenizer, info.vocab_hash)
        ids = []
        for name in ("[CLS]", "[SEP]"):
            token_id = info.backend.token_to_id(name)
            if token_id is None:
                raise ValueError(f"tokenizer {tokenizer} has no {name} token")
            ids.append(int(token_id))
        if title is None:
            title = store.settings.get("mode") == "dpr"
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {max_length}")
        return cls(store, ids[0], ids[1], bool(title), int(max_length), info)

    def _titles(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Title tokens per source document (doc_index) of `ids`, each title read once."""
        docs, first = np.unique(np.asarray(self.store.doc_index[ids]), return_index=True)
        titles = [self.store.title(int(b)) for b in ids[first]]
        encoded = self.tokenizer.encode_batch(titles) if titles else []
        limit = self.max_length // 2
        return {doc: np.asarray(enc.ids[:limit], np.int32)
                for doc, enc in zip(docs.tolist(), encoded)}

    def lengths_and_titles(self, ids: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Row lengths (after truncation) of blocks `ids`, and their title tokens."""
        text = np.asarray(self.store.lengths[ids], np.int64)
        if not self.with_title:
            return np.minimum(text + 2, self.max_length), {}
        titles = self._titles(ids)
        title_len = np.fromiter((len(titles[d]) for d in self.store.doc_index[ids].tolist()),
                                np.int64, len(ids))
        return np.minimum(text + title_len + 3, self.max_length), titles

    def row(self, block_id: int, titles: dict[int, np.ndarray]) -> np.ndarray:
        text = self.store.tokens(block_id).astype(np.int32)
        if not self.with_title:
            return np.concatenate([[self.cls_id], text[:self.max_length - 2], [self.sep_id]])
        title = titles[int(self.store.doc_index[block_id])]
        text = text[:self.max_length - 3 - len(title)]
        return np.concatenate([[self.cls_id], title, [self.sep_id], text, [self.sep_id]])

    def rows(self, ids: Sequence[int]) -> list[np.ndarray]:
        """The rows of blocks `ids` (int32, with special tokens)."""
        ids = np.asarray(ids, np.int64)
        _, titles = self.lengths_and_titles(ids)
        return [self.row(i, titles) for i in ids.tolist()]


# ---------------------------------------------------------------------------------------
# The jitted, sharded forward pass


class CorpusEmbedder:
    """A document tower's forward pass, compiled once per padded shape and reused across
    parameter versions: the batch is sharded over the (data, fsdp) axes of `mesh` (default:
    all local devices on the data axis); outputs are cast to `dtype` on the devices."""

    def __init__(self, config: EmbedderConfig, *, mesh: Mesh | None = None,
                 rules=sharding.DEFAULT_RULES, batch_size: int = 64, dtype: str = "float16"):
        self.config = config
        self.mesh = mesh or sharding.make_mesh((-1, 1, 1), jax.local_devices())
        self.rules = rules
        self.dtype = dtype
        storage_dtype(dtype)  # validates
        self.batch_size = sharding.batch_multiple(max(1, int(batch_size)), self.mesh)
        self._forward, self.param_shardings = tower_forward(config, self.mesh, rules, dtype)

    @property
    def dim(self) -> int:
        return self.config.output_dim

    def batch_rows(self, count: int) -> int:
        """Rows of the padded batch that embeds `count` rows: the next power of two (a
        multiple of the batch shards) up to `batch_size`, so that a few rows (an
        incremental refresh, a corpus's last batch) cost a small batch, and the compiled
        shapes stay few."""
        rows = 1 << max(0, int(count) - 1).bit_length()
        return min(self.batch_size, sharding.batch_multiple(rows, self.mesh))

    @property
    def max_length(self) -> int:
        return self.config.encoder.max_position_embeddings

    def place(self, params: Any) -> Any:
        """Params (host or device arrays) on this embedder's shardings."""
        from flax import linen as nn
        return sharding.place(nn.unbox(params), self.param_shardings)

    def embed_blocks(self, params: Any, rows: RowBuilder, ids: Sequence[int],
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embeddings [len(ids), P] of blocks `ids` in `self.dtype` (bfloat16 as ml_dtypes),
        in the order of `ids`. `params` should come from `place`."""
        if rows.max_length > self.max_length:
            raise ValueError(f"row max_length {rows.max_length} exceeds the tower's "
                             f"max_position_embeddings {self.max_length}")
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), self.dim), numpy_dtype(self.dtype))
        if len(ids) == 0:
            return out
        lengths, titles = rows.lengths_and_titles(ids)
        with sharding.activate(self.mesh, self.rules):
            return embed_rows(
                functools.partial(self._forward, params), lambda i: rows.row(int(ids[i]), titles),
                lengths, out, batch_size=self.batch_size, batch_rows=self.batch_rows,
                max_length=rows.max_length, pad_id=self.config.encoder.pad_token_id,
                progress=progress)


# ---------------------------------------------------------------------------------------
# Shards


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One complete shard: blocks [start, end)."""

    start: int
    end: int
    dim: int
    dtype: str
    model_fingerprint: str
    corpus_fingerprint: str
    path: Path  # the .npy file
    meta: dict[str, Any]

    @property
    def count(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    """What `embed_corpus` did for one worker."""

    shards: list[ShardInfo]
    embedded: int       # blocks embedded now
    reused: int         # blocks in complete shards of an earlier (killed) run
    seconds: float

    @property
    def docs_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def _write_atomic(path: Path, tag: str, write: Callable[[Any], None]) -> None:
    atomic_write(path, write, binary=True, tmp_name=f"{TMP_PREFIX}{tag}-{os.getpid()}-{path.name}")


def read_shard(json_path: str | os.PathLike) -> ShardInfo:
    """A shard's description, checked against its .npy file (ValueError if they differ)."""
    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{json_path}: unreadable shard description ({e})") from None
    if meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_VERSION:
        raise ValueError(f"{json_path}: not a v{SHARD_VERSION} embedding shard")
    npy = json_path.with_suffix(".npy")
    info = ShardInfo(int(meta["start"]), int(meta["end"]), int(meta["dim"]), str(meta["dtype"]),
                     str(meta["model_fingerprint"]), str(meta["corpus_fingerprint"]), npy, meta)
    try:
        check_npy(npy, (info.count, info.dim), storage_dtype(info.dtype), json_path.name)
    except ValueError as e:
        raise ValueError(f"{npy}: {e}") from None
    return info


def list_shards(folder: str | os.PathLike) -> list[ShardInfo]:
    """The complete shards in `folder`, by start id (a damaged one raises ValueError)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    infos = [read_shard(p) for p in sorted(folder.iterdir()) if _SHARD_RE.match(p.name)]
    return sorted(infos, key=lambda s: (s.start, s.end))


def _remove_shard(info_json: Path) -> None:
    info_json.unlink(missing_ok=True)  # the json first: without it the shard does not count
    info_json.with_suffix(".npy").unlink(missing_ok=True)


def write_shard(folder: str | os.PathLike, start: int, array: np.ndarray, *, dtype: str,
                model_fingerprint: str, corpus_fingerprint: str,
                extra: dict[str, Any] | None = None) -> ShardInfo:
    """Write blocks [start, start + len(array)) as a shard (npy, then json; both atomic)."""
    folder = Path(folder)
    end = start + len(array)
    base = folder / f"shard-{start:010d}-{end:010d}"  # (_SHARD_RE)
    stored = to_storage(array, dtype)
    tag = (extra or {}).get("tag", "shard")
    _write_atomic(base.with_suffix(".npy"), tag,
                  lambda f: np.lib.format.write_array(f, stored, allow_pickle=False))
    meta = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "start": start, "end": end,
            "count": end - start, "dim": int(array.shape[1]), "dtype": dtype,
            "model_fingerprint": model_fingerprint, "corpus_fingerprint": corpus_fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
    _write_atomic(base.with_suffix(".json"), tag,
                  lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    fsync_dir(folder)
    return read_shard(base.with_suffix(".json"))


def embed_corpus(store: BlockStore, embedder: CorpusEmbedder, params: Any,
                 out_dir: str | os.PathLike, *, rows: RowBuilder, model_fingerprint: str,
                 step: int | None = None, worker: int = 0, num_workers: int = 1,
                 shard_size: int | None = None,
                 progress: bool = True,
                 on_shard: Callable[[ShardInfo], None] | None = None) -> EmbedResult:
    """Embed this worker's slice of `store` into shards under `out_dir` (`step`: the
    checkpoint step of the tower, recorded in each shard for `merge_shards` to check).

    Complete shards already there for the same model and corpus are kept (a killed run
    resumes); this worker's leftovers (temporary files, shards of another model or of
    other boundaries inside its slice) are removed first."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, end = worker_range(len(store), worker, num_workers)
    size = int(shard_size) if shard_size else max(1, end - start)
    pieces = [(a, min(a + size, end)) for a in range(start, end, size)]
    tag = f"w{worker}"
    reuse: dict[tuple[int, int], ShardInfo] = {}
    for path in sorted(out_dir.iterdir()):
        if path.name.startswith(f"{TMP_PREFIX}{tag}-"):  # ours, of a killed run
            path.unlink(missing_ok=True)
            continue
        match = _SHARD_RE.match(path.name)
        if not match:
            continue
        a, b = int(match.group(1)), int(match.group(2))
        if b <= start or a >= end:
            continue  # another worker's
        try:
            info = read_shard(path)
        except ValueError as e:
            _log.warning("discarding damaged shard: %s", e)
            _remove_shard(path)
            continue
        if ((a, b) in pieces and info.model_fingerprint == model_fingerprint
                and info.corpus_fingerprint == store.fingerprint and info.dim == embedder.dim
                and info.dtype == embedder.dtype and info.meta.get("step") == step):
            reuse[(a, b)] = info
        else:
            _log.warning("discarding shard %s (another model, corpus or layout)", path.name)
            _remove_shard(path)
    reused = sum(b - a for a, b in reuse)
    if reused:
        _log.info("worker %d: reusing %d complete shard(s), %d blocks", worker, len(reuse),
                  reused)

    from tqdm.auto import tqdm

    placed = embedder.place(params)
    shards, embedded = [], 0
    with tqdm(total=end - start, initial=reused, unit="doc", smoothing=0.1,
              desc=f"embedding [{start}, {end})", disable=not progress) as bar:
        for a, b in pieces:
            if (a, b) in reuse:
                shards.append(reuse[(a, b)])
                continue
            array = embedder.embed_blocks(placed, rows, np.arange(a, b), progress=bar.update)
            info = write_shard(out_dir, a, array, dtype=embedder.dtype,
                               model_fingerprint=model_fingerprint,
                               corpus_fingerprint=store.fingerprint,
                               extra={"tag": tag, "worker": worker, "num_workers": num_workers,
                                      "step": step})
            embedded += b - a
            shards.append(info)
            if on_shard is not None:
                on_shard(info)
    result = EmbedResult(shards, embedded, reused, time.perf_counter() - started)
    _log.info("worker %d/%d: embedded %d blocks [%d, %d) in %.1fs (%.1f docs/s), reused %d",
              worker, num_workers, embedded, start, end, result.seconds,
              result.docs_per_second, reused)
    return result


def missing_ranges(shards: Sequence[ShardInfo], count: int) -> list[tuple[int, int]]:
    """The id ranges in [0, count) no shard covers; ValueError if two shards overlap or one
    reaches past `count`."""
    gaps, position, previous = [], 0, None
    for s in sorted(shards, key=lambda s: (s.start, s.end)):
        if s.start < position:
            raise ValueError(f"ids [{s.start}, {min(position, s.end)}) are covered twice: by "
                             f"{previous.path.name} and {s.path.name} in {s.path.parent}")
        if s.end > count:
            raise ValueError(f"{s.path.name} covers ids up to {s.end}, the corpus has {count}")
        if s.start > position:
            gaps.append((position, s.start))
        position, previous = s.end, s
    if position < count:
        gaps.append((position, count))
    return gaps


def merge_shards(folder: str | os.PathLike, count: int, *, model_fingerprint: str | None = None,
                 corpus_fingerprint: str | None = None, step: int | None = None,
                 out: str | os.PathLike | None = None) -> np.ndarray:
    """The full [count, P] matrix from the shards in `folder` (into the .npy file `out` when
    given, else in memory). Every id in [0, count) must be covered exactly once, and all
    shards must agree on dim, dtype, checkpoint step (`step` when given) and fingerprints
    (the given ones)."""
    folder = Path(folder)
    shards = list_shards(folder)
    if not shards:
        raise ValueError(f"no embedding shards in {folder}")
    first = shards[0]
    given = {"model_fingerprint": model_fingerprint or None,
             "corpus_fingerprint": corpus_fingerprint or None, "step": step}
    for s in shards:
        for field in ("dim", "dtype", "model_fingerprint", "corpus_fingerprint", "step"):
            want = first.meta.get(field) if given.get(field) is None else given[field]
            if s.meta.get(field) != want:
                raise ValueError(f"{s.path.with_suffix('.json')}: {field} "
                                 f"{s.meta.get(field)!r} differs from {want!r}")
    gaps = missing_ranges(shards, count)
    if gaps:
        shown = ", ".join(f"[{a}, {b})" for a, b in gaps[:5])
        raise ValueError(f"ids {shown}{' ...' if len(gaps) > 5 else ''} are not covered by any "
                         f"shard in {folder}")
    stored = storage_dtype(first.dtype)
    if out is not None:
        matrix = np.lib.format.open_memmap(out, mode="w+", dtype=stored,
                                           shape=(count, first.dim))
    else:
        matrix = np.empty((count, first.dim), stored)
    for s in shards:
        matrix[s.start:s.end] = np.load(s.path, mmap_mode="r", allow_pickle=False)
    if out is not None:
        matrix.flush()
    return from_storage(matrix, first.dtype)
