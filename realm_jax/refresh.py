"""The refresher process: keeps WORKDIR/index in step with the trainer's document tower.

    realm-jax refresh --config configs/x.py --workdir DIR [--once] [--from_hf HF_DIR]
                      [--corpus STORE] [--worker I --num_workers N] [--config.refresh.*=...]

Loop (worker 0, the chief): take the newest complete checkpoint in WORKDIR/checkpoints
(the ones written while it was busy are skipped), restore only its document tower, embed
the corpus block store, build the ScaNN index, publish an IndexStore snapshot at
WORKDIR/index (checkpoint step, model and corpus fingerprints), prune old versions, append a
line to WORKDIR/refresh_log.jsonl; repeat until the trainer's FINISHED marker exists, with a
last refresh when the final checkpoint is newer than the index. `--from_hf` builds the
first index (step 0) from pretrained weights while no checkpoint exists.

With N workers (hosts: `--worker i --num_workers n`, or the process index and count of a
jax.distributed run), the chief announces each refresh in WORKDIR/refresh/job.json
(checkpoint step, tower and corpus fingerprints, worker count); every worker checks it can
share the job and embeds its contiguous slice into the job's shard folder; the chief merges
and publishes only once the shards cover every row exactly once and all agree on the step,
the tower and the corpus. Workers read checkpoints on their own schedule (no orbax barrier
between processes); they share nothing but WORKDIR.

Corpus updates (`realm-jax corpus update`, realm_jax.data.store): the refresher follows the
newest version of the corpus block store. When the document tower is the one of the
published snapshot (same model fingerprint) and only the store version changed, a refresh
embeds only the blocks that snapshot lacks (new, or of replaced documents; on the chief
alone), reuses the verified embeddings of the others by block id, drops removed blocks, and
rebuilds the ScaNN index; a new tower embeds every block. A snapshot lists the live block
ids of its store version (ids.npy) and names that version (extra.store_version, with
extra.embedded_blocks / reused_blocks); after publishing, the store versions no snapshot
names are pruned.

Kill safety: shards and snapshots appear only complete (temporary names, then rename), so a
restarted refresher reuses the complete shards of the checkpoint it was embedding, drops
the partial ones, and never publishes anything half-written. Only one chief runs per
workdir: it holds WORKDIR/refresh/lock (pid and host; a dead chief's lock on the same host is
taken over). Snapshots are verified before their embeddings are reused, and a snapshot with a
non-finite embedding is never published (the refresh fails, naming the blocks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from realm_jax.checkpoints import CheckpointUnreadable, TrainCheckpoints
from realm_jax.data.store import BlockStore, prune_versions, store_versions
from realm_jax.durable import TRASH_PREFIX, ProcessLock, atomic_write_text, discard
from realm_jax.index.drift import refresh_due
from realm_jax.index.embed_corpus import TITLE_CHOICES
from realm_jax.index.scann_searcher import ScannSearcher, ScannSettings
from realm_jax.index.store import IndexStore, Snapshot, SnapshotError
from realm_jax.workdir import REFRESH_LOG, Workdir, corpus_check

_log = logging.getLogger(__name__)
_stages = logging.getLogger(__name__ + ".stages")  # DEBUG lines: where a refresh is

JOB_FILE = "job.json"
LOCK_FILE = "lock"  # the chief's ProcessLock: one refresher per workdir
DOC_TOWER = "doc_tower"


@dataclasses.dataclass(frozen=True)
class RefreshSettings:
    """The `refresh` section of a config (each field commented once, in configs/common.py's
    `refresh`). corpus: the block store folder; tokenizer: the HF folder the corpus was
    tokenized with ("": the --from_hf folder); both default to config.data's, which the
    trainer reads too. The last checkpoint of a finished run is published whatever
    min_overlap says."""

    corpus: str
    tokenizer: str = ""
    title: str = "auto"
    max_length: int = 0
    batch_size: int = 32
    dtype: str = "float16"
    shard_size: int = 0
    poll_seconds: float = 30.0
    keep_snapshots: int = 3
    doc_tower_hf: str = ""
    min_overlap: float = 0.0
    scann: ScannSettings | None = dataclasses.field(default_factory=ScannSettings)

    @classmethod
    def from_config(cls, config, corpus: str | None = None) -> "RefreshSettings":
        section = config.get("refresh") if hasattr(config, "get") else None
        if section is None:
            raise ValueError("the config has no `refresh` section (see configs/realm.py:tiny)")
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config.refresh: unknown field(s) {unknown}; known: {sorted(known)}")
        data = config.get("data")
        for name in ("corpus", "tokenizer"):  # shared with the trainer: config.data
            if not values.get(name) and data is not None and data.get(name):
                values[name] = data[name]
        if corpus:
            values["corpus"] = corpus
        if not values.get("corpus"):
            raise ValueError("no corpus: set config.data.corpus or pass --corpus STORE "
                             "(a block store made by `realm-jax prepare-corpus`)")
        scann = values.get("scann", {})
        values["scann"] = None if scann is None else ScannSettings(**scann)
        settings = cls(**values)
        if settings.title not in TITLE_CHOICES:
            raise ValueError(f"config.refresh.title must be auto, yes or no, got "
                             f"{settings.title!r}")
        return settings

    @property
    def with_title(self) -> bool | None:
        return TITLE_CHOICES[self.title]

    def embedder(self, config):
        """A CorpusEmbedder of the tower `config` with these batch size and dtype."""
        from realm_jax.index.embed_corpus import CorpusEmbedder
        return CorpusEmbedder(config, batch_size=self.batch_size, dtype=self.dtype)

    def rows(self, store: BlockStore, embedder, tokenizer):
        """The RowBuilder of `embedder`'s rows of `store` (max_length, else the tower's)."""
        from realm_jax.index.embed_corpus import RowBuilder
        return RowBuilder.for_store(store, tokenizer, title=self.with_title,
                                    max_length=self.max_length or embedder.max_length)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a document tower comes from: a checkpoint step, or a HF folder (step 0)."""

    step: int
    kind: str   # "checkpoint" or "hf"
    path: str


@dataclasses.dataclass(frozen=True)
class RefreshResult:
    """One published refresh (also the JSONL line in refresh_log.jsonl)."""

    step: int
    source: str
    version: str
    count: int
    embedded: int
    reused: int
    skipped_steps: list[int]
    restore_seconds: float
    embed_seconds: float
    build_seconds: float
    publish_seconds: float
    seconds: float
    docs_per_second: float
    model_fingerprint: str
    corpus_fingerprint: str


class _Superseded(Exception):
    """A worker's job was replaced by a newer one while it was embedding."""


class Refresher:
    """Refreshes WORKDIR/index from WORKDIR/checkpoints (see the module docstring).

    `embedder_factory(config) -> CorpusEmbedder` may be given to share compiled functions
    (tests); by default one CorpusEmbedder per tower config over all local devices.

    Which document tower embeds the corpus is read from the workdir: the newest
    checkpoint's `doc_tower` when WORKDIR/model.json has that part (the run trains it), else
    the `from_hf` weights (step 0): before the trainer's first checkpoint, and for runs
    whose document tower stays frozen (ORQA, RAG)."""

    def __init__(self, workdir: str | os.PathLike, settings: RefreshSettings, *,
                 from_hf: str | os.PathLike | None = None, worker: int = 0,
                 num_workers: int = 1, progress: bool = True,
                 on_stage: Callable[[str], None] | None = None,
                 embedder_factory: Callable[[Any], Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        from realm_jax.index.embed_corpus import worker_range
        worker_range(1, worker, num_workers)  # validates
        self.workdir = Path(workdir)
        self.settings = settings
        self.from_hf = None if from_hf is None else os.fspath(from_hf)
        if self.from_hf is not None and not Path(self.from_hf).is_dir():
            raise FileNotFoundError(f"--from_hf {self.from_hf}: not a folder")
        self.worker, self.num_workers = worker, num_workers
        self.progress = progress
        self.on_stage = on_stage or (lambda name: _stages.debug("refresh stage: %s", name))
        self.sleep = sleep
        self.layout = Workdir(self.workdir)
        self.checkpoints = TrainCheckpoints(self.layout, independent=True)
        self.index = self.layout.index(keep=settings.keep_snapshots)
        self.scratch = Path(self.layout.refresh_dir)
        corpus = Path(settings.corpus)
        if not corpus.is_dir():
            raise FileNotFoundError(f"corpus block store {corpus}: not found (config "
                                    "data.corpus or --corpus; made by `realm-jax prepare-corpus`)")
        self.store = BlockStore.open(corpus)  # the newest version (see follow_store)
        self._embedder_factory = embedder_factory
        self._embedders: dict[Any, Any] = {}
        self._rows: dict[int, Any] = {}
        self._tokenizer = None  # the TokenizerInfo the rows use, once loaded
        self._last_tower = None  # (source, config, params, fingerprint) of the last refresh
        self._waiting_logged = False
        self._unreadable: set[int] = set()  # checkpoint steps whose document tower won't restore
        self._held: set[int] = set()  # checkpoint steps not embedded (refresh.min_overlap)
        self.blocks_saved = 0

    # ------------------------------------------------------------------ inputs

    def newest_source(self) -> Source | None:
        """The tower to embed with now (see the class docstring), None when there is none."""
        steps = [s for s in self.checkpoints.all_steps() if s not in self._unreadable]
        # (checkpoints without model.json are taken to hold a document tower)
        if steps and (not self.layout.has_model() or DOC_TOWER in self.layout.read_model()):
            return Source(steps[-1], "checkpoint", self.checkpoints.step_path(steps[-1]))
        return None if self.from_hf is None else Source(0, "hf", self.from_hf)

    def published(self) -> Snapshot | None:
        """The served snapshot (`IndexStore.latest_valid`), of a version of the corpus block
        store still on disk (not necessarily the newest)."""
        return self.index.latest_valid(corpus_check(self.store.root), log=_log)

    def follow_store(self) -> None:
        """Open the newest version of the corpus block store when an update made one."""
        if store_versions(self.store.root)[-1] != self.store.version:
            self.store = BlockStore.open(self.store.root)
            # rows are rebuilt for the new version, with the tokenizer already loaded
            self._tokenizer = next((r.tokenizer for r in self._rows.values()), self._tokenizer)
            self._rows.clear()
            _log.info("corpus %s: now at version %d (fingerprint %s)", self.store.root,
                      self.store.version, self.store.fingerprint[:16])

    def _is_current(self, source: Source, snapshot: Snapshot | None) -> bool:
        return (snapshot is not None and snapshot.step == source.step
                and snapshot.manifest.get("extra", {}).get("source") == source.kind
                and snapshot.corpus_fingerprint == self.store.fingerprint)

    def _reusable(self, previous: Snapshot | None, model_fingerprint: str
                  ) -> tuple[np.ndarray, np.ndarray] | None:
        """(block ids, embeddings) of `previous` still valid for the current store version:
        its verified rows of the blocks still live, when the document tower is the same (a
        block id names the same tokens in every version of a store); None when the tower
        differs or the embeddings are damaged."""
        if previous is None or previous.model_fingerprint != model_fingerprint:
            return None
        try:
            embeddings = np.asarray(self.index.verified_embeddings(previous))
        except SnapshotError as e:
            _log.warning("not reusing damaged embeddings (%s); embedding anew", e)
            return None
        ids = previous.ids()
        if ids.max(initial=-1) >= len(self.store):
            return None  # ids past this store's end: not a version of it
        keep = self.store.live[ids]
        return ids[keep], embeddings[keep]

    def load_tower(self, source: Source):
        """(EmbedderConfig, host params) of the document tower of `source`."""
        from realm_jax import hf
        from realm_jax.models.towers import EmbedderConfig

        if source.kind == "hf":
            return hf.load_embedder(source.path)
        config = self.layout.read_model(DOC_TOWER)[DOC_TOWER]
        if not isinstance(config, EmbedderConfig):
            raise ValueError(f"{self.workdir / 'model.json'}: {DOC_TOWER} is a "
                             f"{type(config).__name__}, not an EmbedderConfig")
        return config, self.checkpoints.restore_part(source.step, DOC_TOWER)

    def embedder(self, config):
        if config not in self._embedders:
            make = self._embedder_factory or self.settings.embedder
            self._embedders[config] = make(config)
        return self._embedders[config]

    def rows(self, embedder):
        """The RowBuilder of `embedder`'s rows, one per row length."""
        max_length = self.settings.max_length or embedder.max_length
        if max_length not in self._rows:
            tokenizer = self._tokenizer or self.settings.tokenizer or self.from_hf
            if not tokenizer:
                raise ValueError("no tokenizer: set config.data.tokenizer to the HF folder "
                                 "the corpus was prepared with (or pass --from_hf)")
            self._rows[max_length] = self.settings.rows(self.store, embedder, tokenizer)
        return self._rows[max_length]

    # ------------------------------------------------------------------ scratch

    def _cleanup_scratch(self, keep: Path | None = None, shards: bool = True) -> None:
        """Remove half-deleted folders, and (with `shards`) every shard folder but `keep`."""
        if not self.scratch.is_dir():
            return
        for path in self.scratch.iterdir():
            if path.name.startswith(TRASH_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif shards and path.name.startswith("emb-") and path != keep:
                discard(path)

    def _read_job(self) -> dict | None:
        try:
            return json.loads((self.scratch / JOB_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_job(self, job: dict) -> None:
        """Announce a job (or {"stop": True}); the id makes every announcement distinct."""
        job = dict(job, id=uuid.uuid4().hex)
        atomic_write_text(self.scratch / JOB_FILE, json.dumps(job, indent=1) + "\n")

    # ------------------------------------------------------------------ one refresh

    def refresh(self, source: Source, previous: Snapshot | None = None) -> RefreshResult:
        """Embed the corpus with `source`'s document tower and publish a snapshot."""
        from realm_jax.index.embed_corpus import EmbedResult, merge_shards, params_fingerprint

        started = time.perf_counter()
        self.on_stage("restore")
        if self._last_tower is not None and self._last_tower[0] == source:
            # the same source again (a corpus update since): its tower is still here
            _, config, params, model_fingerprint = self._last_tower
        else:
            config, params = self.load_tower(source)
            model_fingerprint = params_fingerprint(config, params)
            self._last_tower = (source, config, params, model_fingerprint)
        restore_seconds = time.perf_counter() - started
        _log.info("step %d: restored the document tower from %s in %.1fs", source.step,
                  source.path, restore_seconds)
        live = self.store.live_ids()
        reusable = self._reusable(previous, model_fingerprint)
        shard_dir = (self.scratch /
                     f"emb-{source.step:010d}-{model_fingerprint[:16]}-{self.num_workers}w")
        self._cleanup_scratch(keep=shard_dir)
        if self.num_workers > 1 and reusable is None:
            self._write_job({"step": source.step, "kind": source.kind, "path": source.path,
                             "model_fingerprint": model_fingerprint,
                             "corpus_fingerprint": self.store.fingerprint,
                             "shard_dir": shard_dir.name, "num_workers": self.num_workers})

        t0 = time.perf_counter()
        if reusable is not None:
            old_ids, old_embeddings = reusable
            new_ids = np.setdiff1d(live, old_ids, assume_unique=True)
            _log.info("step %d: the document tower equals the one of %s; reusing %d "
                      "embeddings, embedding %d new block(s), dropping %d removed",
                      source.step, previous.version, len(old_ids), len(new_ids),
                      previous.count - len(old_ids))
            self.on_stage("embed")
            new_embeddings = self._embed_ids(config, params, new_ids)
            ids = np.concatenate([old_ids, new_ids])
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
            embeddings = np.concatenate([old_embeddings.astype(new_embeddings.dtype),
                                         new_embeddings])[order]
            result = EmbedResult([], len(new_ids), len(old_ids), time.perf_counter() - t0)
        else:
            self.on_stage("embed")
            result = self._embed_slice(config, params, shard_dir, model_fingerprint,
                                       source.step, on_shard=lambda info: self.on_stage("shard"))
            if self.num_workers > 1:
                self.on_stage("wait_workers")
                self._wait_for_shards(shard_dir)
            self.on_stage("merge")
            embeddings = merge_shards(shard_dir, len(self.store), step=source.step,
                                      model_fingerprint=model_fingerprint,
                                      corpus_fingerprint=self.store.fingerprint)
            ids = live
            if len(live) < len(self.store):
                embeddings = embeddings[live]  # (removed blocks: embedded, never published)
        # reused: the previous snapshot's rows, or a killed run's shards
        embedded, reused = result.embedded, result.reused
        embed_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        searcher = None
        if self.settings.scann is not None:
            self.on_stage("build")
            searcher = ScannSearcher.build(np.asarray(embeddings, np.float32), ids,
                                           settings=self.settings.scann)
        build_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.on_stage("publish")
        skipped = [s for s in self.checkpoints.all_steps()
                   if (previous.step if previous else -1) < s < source.step] \
            if source.kind == "checkpoint" else []
        snapshot = self.index.publish(
            embeddings, ids=ids, step=source.step, model_fingerprint=model_fingerprint,
            corpus_fingerprint=self.store.fingerprint, scann=searcher,
            dtype=self.settings.dtype,
            extra={"source": source.kind, "source_path": source.path,
                   "corpus_path": os.fspath(self.store.root),
                   "store_version": self.store.version, "embedded_blocks": int(embedded),
                   "reused_blocks": int(reused)},
            on_stage=lambda name: self.on_stage(f"publish:{name}"))
        publish_seconds = time.perf_counter() - t0
        self.on_stage("published")
        self._prune_store_versions()
        self._cleanup_scratch()
        seconds = time.perf_counter() - started
        out = RefreshResult(
            step=source.step, source=source.kind, version=snapshot.version,
            count=snapshot.count, embedded=int(embedded), reused=int(reused),
            skipped_steps=skipped, restore_seconds=restore_seconds,
            embed_seconds=embed_seconds, build_seconds=build_seconds,
            publish_seconds=publish_seconds, seconds=seconds,
            docs_per_second=result.docs_per_second,
            model_fingerprint=model_fingerprint, corpus_fingerprint=self.store.fingerprint)
        self._log_result(out)
        self.on_stage("logged")
        return out

    def _embed_ids(self, config, params, ids: np.ndarray) -> np.ndarray:
        """Embeddings of blocks `ids` (in that order) by the tower (config, params)."""
        if len(ids) == 0:  # (no embedder compiled for nothing)
            from realm_jax.index.embed_corpus import numpy_dtype
            return np.zeros((0, config.output_dim), numpy_dtype(self.settings.dtype))
        embedder = self.embedder(config)
        return embedder.embed_blocks(embedder.place(params), self.rows(embedder), ids)

    def _embed_slice(self, config, params, shard_dir: Path, model_fingerprint: str, step: int,
                     on_shard: Callable[[Any], None]):
        """This worker's slice of the corpus embedded into shards of `shard_dir`."""
        from realm_jax.index.embed_corpus import embed_corpus

        embedder = self.embedder(config)
        return embed_corpus(self.store, embedder, params, shard_dir,
                            rows=self.rows(embedder), model_fingerprint=model_fingerprint,
                            step=step, worker=self.worker, num_workers=self.num_workers,
                            shard_size=self.settings.shard_size or None,
                            progress=self.progress, on_shard=on_shard)

    def _prune_store_versions(self) -> None:
        """Delete the corpus versions no snapshot of WORKDIR/index names any more (never
        version 0 nor the newest; see realm_jax.data.store.prune_versions)."""
        named = set()
        for version in self.index.versions():
            try:
                named.add(self.index.load(version, validate=False).store_version)
            except (OSError, ValueError):
                return  # a snapshot we cannot read: delete nothing
        prune_versions(self.store.root, keep=named)

    def _wait_for_shards(self, shard_dir: Path) -> None:
        from realm_jax.index.embed_corpus import list_shards, missing_ranges

        last_log = time.monotonic()
        while True:
            missing = missing_ranges(list_shards(shard_dir), len(self.store))
            if not missing:
                return
            if time.monotonic() - last_log > 60:
                _log.info("waiting for the other workers' shards: %d id range(s) missing, "
                          "first [%d, %d)", len(missing), *missing[0])
                last_log = time.monotonic()
            self.sleep(min(self.settings.poll_seconds, 1.0))

    def _log_result(self, result: RefreshResult) -> None:
        self._append_log(dataclasses.asdict(result))
        skipped = f"; skipped steps {result.skipped_steps}" if result.skipped_steps else ""
        _log.info("published %s (step %d, %d blocks) in %.1fs: restore %.1fs, embed %.1fs "
                  "(%.1f docs/s, %d reused), build %.1fs, publish %.1fs%s", result.version,
                  result.step, result.count, result.seconds, result.restore_seconds,
                  result.embed_seconds, result.docs_per_second, result.reused,
                  result.build_seconds, result.publish_seconds, skipped)

    def refresh_once(self) -> RefreshResult | None:
        """Refresh from the newest source if the index is not already at it (chief)."""
        self.follow_store()
        source = self.newest_source()
        if source is None:
            return None
        previous = self.published()
        if self._is_current(source, previous):
            self._cleanup_scratch()  # shards of a run killed after publishing
            return None
        if self._drift_holds(source, previous):
            return None
        try:
            return self.refresh(source, previous)
        except (FileNotFoundError, KeyError, ValueError) as e:  # (CheckpointUnreadable too)
            steps = self.checkpoints.all_steps()
            if source.kind == "checkpoint" and source.step not in steps:
                # the trainer deleted it (max_to_keep) while it was being restored
                _log.warning("checkpoint step %d disappeared while refreshing (%s); moving on",
                             source.step, e)
                return None
            if not isinstance(e, CheckpointUnreadable):
                raise
            self._unreadable.add(source.step)  # damaged, not pruned
            if self._unreadable.issuperset(steps):  # not the files: e.g. another model
                raise
            _log.warning("%s: refreshing from the previous checkpoint", e)
            return self.refresh_once()

    def _drift_holds(self, source: Source, previous: Snapshot | None) -> bool:
        """refresh.min_overlap: whether to leave `previous` served although `source` is
        newer, because the trainer's newest drift measurement of it (drift.json) has an
        overlap@k of at least min_overlap (or it has not measured `previous` yet). No drift
        file (the trainer does not measure), no index yet, or a finished run: publish. Each
        checkpoint held is logged once to refresh_log.jsonl with the blocks it saved."""
        if (not self.settings.min_overlap or previous is None or source.kind != "checkpoint"
                or self.checkpoints.is_finished()):
            return False
        drift = self.layout.read_drift()
        if drift is None or (drift["index"] == previous.version
                             and refresh_due(drift["overlap"], self.settings.min_overlap)):
            return False
        if source.step not in self._held:
            self._held.add(source.step)
            self.blocks_saved += len(self.store)
            line = {"held_step": source.step, "index": previous.version,
                    "measured_index": drift["index"], "overlap": drift["overlap"],
                    "min_overlap": self.settings.min_overlap, "blocks_saved": len(self.store),
                    "blocks_saved_total": self.blocks_saved}
            self._append_log(line)
            _log.info("checkpoint %d not embedded: overlap %.3f of index %s >= "
                      "refresh.min_overlap %.3f (%d blocks saved so far)", source.step,
                      drift["overlap"], drift["index"], self.settings.min_overlap,
                      self.blocks_saved)
        return True

    def _append_log(self, line: dict) -> None:
        """One line of WORKDIR/refresh_log.jsonl, stamped with the time (UTC)."""
        line = dict(line, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        fd = os.open(self.workdir / REFRESH_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)  # one write: lines never interleave
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ loops

    def run(self, once: bool = False) -> list[RefreshResult]:
        """The chief's loop (worker 0) or a worker's (see `run_worker`)."""
        if self.worker != 0:
            return self.run_worker(once)
        lock = ProcessLock.acquire(self.scratch / LOCK_FILE, "refresher")  # one chief per workdir
        results: list[RefreshResult] = []
        try:
            self._cleanup_scratch(shards=False)  # kept: a killed run's shards are resumed
            while True:
                finished = self.checkpoints.is_finished()  # before looking at the steps
                result = self.refresh_once()
                if result is not None:
                    results.append(result)
                elif once:
                    self._nothing_to_do(fail=True)
                if once or finished:
                    if finished:
                        _log.info("the trainer has finished; the index is at its last checkpoint")
                    return results
                if result is None:
                    self._nothing_to_do(fail=False)
                    self.sleep(self.settings.poll_seconds)
        finally:
            if self.num_workers > 1 and (once or self.checkpoints.is_finished()):
                self._write_job({"stop": True})
            lock.release()

    def _nothing_to_do(self, fail: bool) -> None:
        source = self.newest_source()
        if source is None:
            message = (f"no checkpoint in {self.checkpoints.directory} and no --from_hf "
                       "weights to build a first index from")
            if fail:
                raise FileNotFoundError(message)
            if not self._waiting_logged:
                _log.info("%s: waiting", message)
                self._waiting_logged = True
        elif fail:
            _log.info("the index is already at step %d (%s)", source.step, source.path)

    def run_worker(self, once: bool = False) -> int:
        """A non-chief worker: embed this worker's slice for each job the chief announces;
        returns the number of jobs done. It exits when the chief says stop, after one job
        with `once`, or when nothing is left to announce: the index is at the newest
        checkpoint and (unless `once`) the trainer has finished. An announcement found at
        start is a previous run's: its job is done unless already published, its stop
        ignored."""
        from realm_jax.index.embed_corpus import params_fingerprint

        stale = self._read_job()
        done_job, jobs = None, 0
        while True:
            job = self._read_job()
            if job and job.get("stop") and job != stale:
                return jobs
            if job and not job.get("stop") and job != done_job:
                done_job = job
                source = Source(int(job["step"]), job["kind"], job["path"])
                self.follow_store()
                self._check_job(job)
                if self._is_current(source, self.published()):
                    continue
                try:
                    config, params = self.load_tower(source)
                    fingerprint = params_fingerprint(config, params)
                    if fingerprint != job["model_fingerprint"]:
                        raise ValueError(f"{source.path}: document tower fingerprint "
                                         f"{fingerprint[:16]} != the chief's "
                                         f"{job['model_fingerprint'][:16]}")

                    def check(_info, job=job):
                        if self._read_job() != job:
                            raise _Superseded()

                    self.on_stage("embed")
                    self._embed_slice(config, params, self.scratch / job["shard_dir"],
                                      fingerprint, source.step, on_shard=check)
                    jobs += 1
                    if once:
                        return jobs
                except _Superseded:
                    _log.info("worker %d: job for step %d superseded", self.worker, source.step)
                except (FileNotFoundError, KeyError) as e:
                    _log.warning("worker %d: cannot do the job for step %d (%s); waiting for the "
                                 "next", self.worker, source.step, e)
            elif self._nothing_left(once):
                _log.info("worker %d: the index is at the newest checkpoint%s; exiting",
                          self.worker, "" if once else " and the trainer has finished")
                return jobs
            self.sleep(min(self.settings.poll_seconds, 1.0))

    def _check_job(self, job: dict) -> None:
        """A job this worker can share: the same worker count and the same corpus."""
        if int(job["num_workers"]) != self.num_workers:
            raise ValueError(f"worker {self.worker}: the chief splits the corpus over "
                             f"{job['num_workers']} workers, this one was started with "
                             f"--num_workers {self.num_workers}; start all with the same")
        if job.get("corpus_fingerprint", self.store.fingerprint) != self.store.fingerprint:
            raise ValueError(f"worker {self.worker}: corpus {self.store.path} (fingerprint "
                             f"{self.store.fingerprint[:16]}) is not the chief's "
                             f"({job['corpus_fingerprint'][:16]}): give every worker the same "
                             "block store (--corpus or config.data.corpus)")

    def _nothing_left(self, once: bool) -> bool:
        """True when the chief has nothing more to announce: the index is at the newest
        source and, unless `once`, the trainer has finished."""
        finished = once or self.checkpoints.is_finished()
        source = self.newest_source()
        return finished and source is not None and self._is_current(source, self.published())


def main(config, workdir: str | os.PathLike, *, once: bool = False,
         from_hf: str | None = None, corpus: str | None = None, worker: int | None = None,
         num_workers: int | None = None, progress: bool = True,
         on_stage: Callable[[str], None] | None = None) -> list[RefreshResult]:
    """`realm-jax refresh`: settings from `config.refresh`, then the refresher's loop.
    `worker` / `num_workers` default to this process's index and the process count (0 and
    1 outside a multi-process run)."""
    import jax

    settings = RefreshSettings.from_config(config, corpus)
    from_hf = from_hf or settings.doc_tower_hf or None
    worker = jax.process_index() if worker is None else worker
    num_workers = jax.process_count() if num_workers is None else num_workers
    refresher = Refresher(workdir, settings, from_hf=from_hf, worker=worker,
                          num_workers=num_workers, progress=progress, on_stage=on_stage)
    result = refresher.run(once=once)
    return result if isinstance(result, list) else []


def publish_initial_index(config, tower, tower_params, index_dir: str | os.PathLike
                          ) -> Snapshot:
    """A first snapshot (step 0) in `index_dir`: the corpus embedded by the document tower
    (`tower`: its EmbedderConfig, `tower_params`: host params) with the config's refresh
    settings; what the refresher publishes from a run's step-0 checkpoint, for runs that
    keep one index all along (tests, benchmarks)."""
    from realm_jax.index.embed_corpus import params_fingerprint

    settings = RefreshSettings.from_config(config)
    store = BlockStore.open(settings.corpus)
    embedder = settings.embedder(tower)
    rows = settings.rows(store, embedder, settings.tokenizer)
    embeddings = embedder.embed_blocks(embedder.place(tower_params), rows, np.arange(len(store)))
    return IndexStore(index_dir).publish(
        embeddings, step=0, model_fingerprint=params_fingerprint(tower, tower_params),
        corpus_fingerprint=store.fingerprint, dtype=settings.dtype, scann=settings.scann)
