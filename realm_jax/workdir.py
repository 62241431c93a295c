"""The WORKDIR contract: what a run's folder holds, and the one place it is read and written.

    WORKDIR/
      config.json          the experiment config (the trainer writes it; eval / answer read it)
      model.json           each part's model config: {"query_tower": {...}, "reader": {...}}
      checkpoints/         orbax steps: params, train_state, meta (the trainer; see
                           realm_jax.checkpoints); FINISHED when training has ended
      index/               versioned index snapshots and LATEST (the refresher publishes)
      refresh/             the refresher's scratch: embedding shards, job.json
      refresh_log.jsonl    a line per published refresh
      metrics/             metrics.jsonl and TensorBoard events (the trainer)
      eval/                predictions and metrics of `realm-jax eval`
      heldout_baseline.json   REALM's first held-out evaluation, per query
      drift.json           the fine-tuning trainer's newest drift measurement of the served
                           index (retrieval.drift_every); read by `refresh.min_overlap`

The trainer, the refresher and the eval / answer commands share nothing but this folder
(a local path or a bucket path). Each file is written whole (a crash leaves the old or the
new version) and read with the same validation by everyone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from realm_jax import config as config_lib
from realm_jax import distributed
from realm_jax.durable import atomic_write_text
from realm_jax.index.store import IndexStore, Snapshot, SnapshotError, SnapshotWatcher
from realm_jax.models import config_from_dict, config_to_dict

CONFIG_JSON = "config.json"
MODEL_JSON = "model.json"
CHECKPOINTS_DIR = "checkpoints"
FINISHED = "FINISHED"
INDEX_DIR = "index"
REFRESH_DIR = "refresh"
REFRESH_LOG = "refresh_log.jsonl"
METRICS_DIR = "metrics"
EVAL_DIR = "eval"
HELDOUT_BASELINE = "heldout_baseline.json"
DRIFT_JSON = "drift.json"

_log = logging.getLogger(__name__)


class ModelMismatch(ValueError):
    """The model a run asks for is not the one its workdir's checkpoints hold."""


def _folder(name: str) -> property:
    """A Workdir property: the path of its subfolder `name`."""
    return property(lambda self: self.root / name)


class Workdir:
    """A run's folder (see the module docstring). Only process 0 writes the JSON files."""

    checkpoints = _folder(CHECKPOINTS_DIR)
    index_dir = _folder(INDEX_DIR)
    refresh_dir = _folder(REFRESH_DIR)
    metrics_dir = _folder(METRICS_DIR)
    eval_dir = _folder(EVAL_DIR)

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        if "://" not in root:  # orbax refuses relative local paths
            root = os.path.abspath(root)
        self.root = epath.Path(root)

    def __repr__(self) -> str:
        return f"Workdir({os.fspath(self.root)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def path(self, name: str) -> epath.Path:
        return self.root / name

    def create(self) -> "Workdir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # ---- config.json: the experiment config

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        if jax.process_index() == 0:
            atomic_write_text(self.root / CONFIG_JSON,
                              config.to_json_best_effort(indent=2) + "\n")

    def read_config(self) -> ml_collections.ConfigDict:
        """The run's config, with the defaults of fields added since it was written."""
        path = self.root / CONFIG_JSON
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; `realm-jax train` writes the run's config "
                                    "there (or pass --config)")
        return config_lib.with_defaults(_read_json(path))

    # ---- model.json: each part's model config

    def write_model(self, configs: dict) -> None:
        if jax.process_index() == 0:
            text = json.dumps({name: config_to_dict(cfg) for name, cfg in configs.items()},
                              indent=2) + "\n"
            atomic_write_text(self.root / MODEL_JSON, text)

    def read_model(self, *required: str, hint: str = "") -> dict:
        """The parts' model configs from model.json; a `required` part missing raises
        ValueError naming the file, the parts it has, then `hint`."""
        path = self.root / MODEL_JSON
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; the trainer writes each part's model "
                                    "config there")
        raw = _read_json(path)
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{path}: expected an object of model parts, got {raw!r:.80}")
        out = {}
        for name, value in raw.items():
            try:
                out[name] = config_from_dict(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: part {name!r}: {e}") from None
        missing = [part for part in required if part not in out]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} config (parts: {sorted(out)})"
                             f"{hint}")
        return out

    def has_model(self) -> bool:
        return (self.root / MODEL_JSON).exists()

    def check_model(self, configs: dict, *, allow: tuple[str, ...] = ()) -> None:
        """Refuse to resume with another model than the one model.json records: a
        ModelMismatch naming each differing field (`part.field.sub`), unless every
        difference is a field named in `allow` (its last name, e.g. "dropout_rate")."""
        recorded = self.read_model()
        diffs = []
        for part in sorted(set(recorded) | set(configs)):
            if part not in recorded or part not in configs:
                diffs.append(f"{part} (part {'added' if part in configs else 'removed'})")
                continue
            diffs += _differences(config_to_dict(recorded[part]), config_to_dict(configs[part]),
                                  part)
        refused = [d for d in diffs if d.split(" ")[0].rsplit(".", 1)[-1] not in allow]
        if refused:
            raise ModelMismatch(
                f"{self.root / MODEL_JSON}: the run's checkpoints hold another model: "
                f"{'; '.join(refused)}; resume with the recorded settings or use a new workdir")
        if diffs:
            _log.warning("resuming %s with changed %s (allowed)", self.root, "; ".join(diffs))

    # ---- drift.json: the newest drift measurement of the served index

    def write_drift(self, *, step: int, index: str, index_step: int, overlap: float) -> None:
        """Record that at training step `step` the served snapshot `index` (of checkpoint
        `index_step`) gave the probes a mean overlap@k of `overlap` with the live towers."""
        atomic_write_text(self.root / DRIFT_JSON, json.dumps(
            {"step": int(step), "index": index, "index_step": int(index_step),
             "overlap": float(overlap)}, sort_keys=True) + "\n")

    def read_drift(self) -> dict | None:
        """The newest drift measurement (write_drift's fields), or None when there is none."""
        path = self.root / DRIFT_JSON
        if not path.exists():
            return None
        drift = _read_json(path)
        missing = {"step", "index", "index_step", "overlap"} - set(drift)
        if missing:
            raise ValueError(f"{path}: missing {sorted(missing)}")
        return drift

    # ---- the index

    def index(self, root: str | os.PathLike | None = None, keep: int = 3) -> IndexStore:
        """The snapshot store: WORKDIR/index, or `root` (another run's index)."""
        return IndexStore(root or self.index_dir, keep=keep)

    def index_watcher(self, corpus, root: str | os.PathLike | None = None):
        """The one way trainers and answerers follow an index: validated snapshots of the
        corpus, newest first, one decision for all processes. `corpus`: a BlockStore (any of
        its versions still on disk, each snapshot checked against the version it names; read
        its tokens through `snapshot_store`), or a corpus fingerprint (that corpus only)."""
        from realm_jax.data.store import BlockStore
        check = corpus_check(corpus.root) if isinstance(corpus, BlockStore) else corpus
        return distributed.shared_watcher(SnapshotWatcher(
            self.index(root), expected_corpus_fingerprint=check, log=_log))

    @staticmethod
    def snapshot_store(snapshot: Snapshot, store):
        """The version of block store `store` (a BlockStore, any version) that `snapshot` was
        built from: candidates' tokens are read from it, never from another version. A
        SnapshotError when that version is gone (pruned) or is another corpus."""
        from realm_jax.data.store import BlockStore
        version = snapshot.store_version
        if store.version != version:
            try:
                store = BlockStore.open(store.root, version=version)
            except FileNotFoundError as e:
                raise SnapshotError(snapshot.path, "manifest.json:extra.store_version",
                                    f"refusing it: {e}") from None
        if store.fingerprint != snapshot.corpus_fingerprint:
            raise SnapshotError(snapshot.path, "manifest.json:corpus_fingerprint",
                                f"{snapshot.corpus_fingerprint[:16]} is not the fingerprint "
                                f"of {store.path} ({store.fingerprint[:16]}): another corpus")
        return store

    def wait_for_snapshot(self, watcher, timeout: float) -> Snapshot:
        """The first snapshot `watcher` serves, waiting up to `timeout` seconds for the
        refresher (0: no wait; FileNotFoundError when there is none)."""
        deadline = time.monotonic() + timeout
        logged = False
        while True:
            snapshot = watcher.poll()
            if snapshot is not None:
                return snapshot
            if timeout <= 0 or distributed.agree(time.monotonic() > deadline):
                message = (f"no index snapshot in {watcher.store.root}"
                           + (f" after {timeout:.0f}s" if timeout > 0 else "")
                           + f": start the refresher (realm-jax refresh --config ... --workdir "
                           f"{self.root}), or build a first index with `realm-jax refresh "
                           "--once --from_hf DOC_TOWER`")
                raise (TimeoutError if timeout > 0 else FileNotFoundError)(message)
            if not logged:
                _log.info("waiting for the refresher to publish a first index in %s",
                          watcher.store.root)
                logged = True
            time.sleep(1.0)

    # ---- the end of training

    def is_finished(self) -> bool:
        return (self.checkpoints / FINISHED).exists() or (self.root / FINISHED).exists()

    def mark_finished(self, step: int) -> None:
        if jax.process_index() == 0:
            atomic_write_text(self.checkpoints / FINISHED, f"{step}\n")

    def clear_finished(self) -> None:
        """A finished run asked for more steps is unfinished again."""
        if jax.process_index() == 0:
            (self.checkpoints / FINISHED).unlink(missing_ok=True)


def corpus_check(root: str | os.PathLike):
    """For `IndexStore.validate`: a snapshot's manifest -> the fingerprint of the version of
    the block store at `root` it names (FileNotFoundError when that version is gone)."""
    from realm_jax.data.store import version_fingerprint

    def expected(manifest: dict) -> str:
        return version_fingerprint(root, int(manifest.get("extra", {}).get("store_version", 0)))
    return expected


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _differences(old: Any, new: Any, where: str) -> list[str]:
    """`where.field: old -> new` for each leaf that differs between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}")
        return out
    return [] if old == new else [f"{where} ({old!r} -> {new!r})"]
