"""Versioned index snapshots, published atomically under one root folder.

    ROOT/
      LATEST                  the name of the current snapshot folder ("v000012\\n")
      v000011/  v000012/      complete snapshots, never modified once in place:
        manifest.json           step, fingerprints, count, dim, dtype, searcher settings,
                                creation time, and the size and sha256 of every file
        embeddings.npy          [N, P] float32/float16 (bfloat16 stored as raw uint16)
        ids.npy                 [N] int64 block ids
        scann/                  ScaNN artifacts (optional)
      .tmp-*                  a snapshot (or LATEST) being written
      .trash-*                a pruned snapshot being deleted

Publishing writes a `.tmp-*` folder, fsyncs every file and the folder, renames it to the
next free `vNNNNNN`, then replaces LATEST atomically (temp file, fsync, os.replace, fsync
of the root). A snapshot with a non-finite embedding is refused before anything is written;
a failed publish (a full disk) removes its `.tmp-*` folder and leaves LATEST as it was.
Leftover `.tmp-*` folders of dead publishers and `.trash-*` folders are removed by the next
publish.

Readers follow LATEST only. Every snapshot anyone serves or reuses is checked by
`IndexStore.validate`, the one check: manifest fields, every file's presence, size and sha256,
array headers, the corpus fingerprint. The sha256 pass is made once per version and file
state (an `IndexStore` remembers the versions it verified with their files' size and
modification stamps, and verifies again when those change), so a reader polling LATEST pays
it once per new snapshot. When LATEST's snapshot fails, readers fall back to the newest valid
older one with a warning naming the folder and what failed; a LATEST that cannot be read
(missing, undecodable, naming no snapshot) is treated the same way.

Local paths are what is tested; other etils.epath paths (buckets) use the same sequence,
without fsync (object stores make the final LATEST write atomic by themselves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from typing import Any, Callable

import numpy as np
from etils import epath

from realm_jax.data.store import version_entries, version_name, version_number
from realm_jax.durable import (TMP_PREFIX, TRASH_PREFIX, atomic_write, discard, fsync_dir,
                               fsync_file, is_local, naming_disk_full, process_alive, tmp_name,
                               tmp_writer)
from realm_jax.index import base

LATEST = "LATEST"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
IDS = "ids.npy"
SCANN_DIR = "scann"
FORMAT = "realm-jax-index-snapshot"
FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "format_version": int, "step": int, "model_fingerprint": str,
    "corpus_fingerprint": str, "count": int, "dim": int, "dtype": str, "searcher": dict,
    "created": str, "files": dict,
}
_STALE_REMOTE_TMP_S = 3600.0
_FINITE_CHUNK_ROWS = 1 << 16

PathLike = str | os.PathLike
CorpusCheck = str | Callable[[dict], str] | None


class SnapshotError(Exception):
    """A snapshot failed validation; names the folder and the failing field or file."""

    def __init__(self, path: PathLike, what: str, message: str):
        self.path, self.what = os.fspath(path), what
        super().__init__(f"index snapshot {self.path}: {what}: {message}")


def _size(path: epath.Path) -> int:
    return os.path.getsize(path) if is_local(path) else int(path.stat().length)


def _sha256(path: epath.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _walk_files(folder: epath.Path) -> list[tuple[str, epath.Path]]:
    """(relative path, path) of every file under folder, sorted."""
    return sorted(((top / name).relative_to(folder).as_posix(), top / name)
                  for top, _, names in folder.walk() for name in names)


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    """Copy every file under `src` to the same relative path under `dst`."""
    for rel, path in _walk_files(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        path.copy(dst / rel)


def _write_npy(path: epath.Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _read_npy(path: epath.Path) -> np.ndarray:
    with path.open("rb") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def storage_dtype(dtype: str) -> np.dtype:
    """How embeddings of `dtype` are kept in a .npy file (bfloat16 as raw uint16)."""
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def numpy_dtype(dtype: str) -> np.dtype:
    """The in-memory numpy dtype of `dtype` (ml_dtypes for bfloat16)."""
    if dtype == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return storage_dtype(dtype)


def to_storage(array: Any, dtype: str) -> np.ndarray:
    """`array` (numpy or jax) cast to `dtype`, C-ordered, in its storage dtype."""
    return np.ascontiguousarray(array, numpy_dtype(dtype)).view(storage_dtype(dtype))


def from_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """A stored array viewed in its in-memory dtype (bfloat16 from raw uint16)."""
    return array.view(numpy_dtype(dtype)) if dtype == "bfloat16" else array


def _file_state(path: epath.Path) -> tuple:
    """What changes when a file is rewritten: size and modification stamps."""
    if is_local(path):
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    st = path.stat()
    return (int(st.length), getattr(st, "mtime", None))


def non_finite_rows(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """Indices of the rows of `array` (stored as `dtype_name`) holding a NaN or infinity,
    checked a slice of rows at a time."""
    array = from_storage(array, dtype_name)
    bad = []
    for start in range(0, len(array), _FINITE_CHUNK_ROWS):
        chunk = np.asarray(array[start:start + _FINITE_CHUNK_ROWS], dtype=np.float32)
        bad.append(start + np.flatnonzero(~np.isfinite(chunk).all(axis=1)))
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def check_npy(path: PathLike, shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    """ValueError unless the .npy file `path` holds a C-ordered `dtype` array of `shape`
    (what `source` says it holds) and nothing past it."""
    path = epath.Path(path)
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"npy format version {version}")
            read = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
            got_shape, fortran, got_dtype = read(f)
            header = f.tell()
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable npy header ({e})") from None
    if fortran:
        raise ValueError("unreadable npy header (Fortran-ordered array)")
    if got_shape != tuple(shape) or got_dtype != dtype:
        raise ValueError(f"holds {got_dtype}{list(got_shape)}, {source} says "
                         f"{dtype}{list(shape)}")
    size = _size(path)
    if size != header + math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{size} bytes, truncated or padded")


def _checked_npy(folder: epath.Path, rel: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """`check_npy` of the snapshot's file `rel` against its manifest, as a SnapshotError."""
    try:
        check_npy(folder / rel, shape, dtype, "manifest")
    except ValueError as e:
        raise SnapshotError(folder, rel, str(e)) from None


def _manifest_field(name: str, kind: type) -> property:
    """A read-only property: manifest[name] as `kind`."""
    return property(lambda self: kind(self.manifest[name]))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A validated, published snapshot (read-only view of its folder)."""

    path: epath.Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def number(self) -> int:
        return version_number(self.version) or 0

    # Manifest fields; `step`: the checkpoint step the embeddings were computed from.
    step = _manifest_field("step", int)
    count = _manifest_field("count", int)
    dim = _manifest_field("dim", int)
    dtype = _manifest_field("dtype", str)
    model_fingerprint = _manifest_field("model_fingerprint", str)
    corpus_fingerprint = _manifest_field("corpus_fingerprint", str)

    @property
    def store_version(self) -> int:
        """The block store version the snapshot was built from (0 for snapshots of stores
        never updated, and of refreshers before versions)."""
        return int(self.manifest.get("extra", {}).get("store_version", 0))

    @property
    def scann_settings(self) -> dict[str, Any] | None:
        return self.manifest["searcher"].get("scann")

    def staleness(self, train_step: int) -> int:
        """Training steps since the checkpoint these embeddings came from."""
        return int(train_step) - self.step

    def embeddings(self) -> np.ndarray:
        """[count, dim] in the stored dtype (memory-mapped for local folders)."""
        path = self.path / EMBEDDINGS
        if is_local(path):
            array = np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
        else:
            array = _read_npy(path)
        return from_storage(array, self.dtype)

    def ids(self) -> np.ndarray:
        return _read_npy(self.path / IDS)

    def block_embeddings(self, rows: int | None = None) -> np.ndarray:
        """The embeddings indexed by block id: [rows (default: max id + 1), dim], zero rows
        for ids the snapshot lacks (removed blocks of an updated corpus; never returned by
        a search). The stored matrix itself when its ids are 0..rows-1."""
        ids, embeddings = self.ids(), self.embeddings()
        rows = int(ids.max(initial=-1)) + 1 if rows is None else int(rows)
        if np.array_equal(ids, np.arange(rows)):
            return embeddings
        if rows <= ids.max(initial=-1):
            raise ValueError(f"index {self.path}: block ids up to {ids.max()} do not fit in "
                             f"{rows} rows")
        out = np.zeros((rows, embeddings.shape[1]), embeddings.dtype)
        out[ids] = embeddings
        return out

    def numpy_searcher(self) -> base.NumpySearcher:
        return base.NumpySearcher(self.embeddings(), self.ids())

    def scann_searcher(self, num_threads: int | None = None):
        """The serialized ScaNN searcher (copied to a local temporary folder first when the
        snapshot is not local)."""
        from realm_jax.index.scann_searcher import ScannSearcher
        if self.scann_settings is None:
            raise SnapshotError(self.path, "searcher.scann", "this snapshot has no ScaNN index")
        folder = self.path / SCANN_DIR
        if is_local(folder):
            return ScannSearcher.load(os.fspath(folder), self.ids(), num_threads)
        with tempfile.TemporaryDirectory() as local:
            _copy_tree(folder, epath.Path(local))
            return ScannSearcher.load(local, self.ids(), num_threads)

    def device_searcher(self, mesh=None, **kwargs):
        """A DeviceSearcher over these embeddings (kwargs: block_size, dtype, rules)."""
        from realm_jax.index.device import DeviceSearcher
        return DeviceSearcher(self.embeddings(), self.ids(), mesh=mesh, **kwargs)


class IndexStore:
    """Versioned snapshots under `root` (e.g. WORKDIR/index); see the module docstring.

    One publisher at a time is expected (the refresher's chief); a second one is safe for
    the data (version folders are claimed by an atomic rename) but not for LATEST order.
    """

    def __init__(self, root: PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = epath.Path(root)
        self.keep = keep
        self._verified: dict[str, tuple] = {}  # version -> its files' states when verified

    # ----------------------------------------------------------------- reading

    def versions(self) -> list[str]:
        """Published snapshot folders, oldest first (complete, unless edited by hand)."""
        return version_entries(self.root)

    def latest_version(self) -> str | None:
        """The folder LATEST names, or None when nothing has been published."""
        pointer = self.root / LATEST
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as e:
            raise SnapshotError(pointer, LATEST, f"not text ({e})") from None
        if version_number(name) is None:
            raise SnapshotError(pointer, LATEST, f"does not name a snapshot folder: {name!r}")
        return name

    def validate(self, version: str, expected_corpus_fingerprint: CorpusCheck = None
                 ) -> dict[str, Any]:
        """Check a snapshot's manifest against its files (presence, sizes, sha256, array
        shapes and dtypes) and against the corpus (`expected_corpus_fingerprint`: the
        fingerprint, or a function of the manifest giving the fingerprint of the corpus
        version it names, FileNotFoundError when that is gone); returns the manifest or raises
        SnapshotError naming the folder and the failing field or file. The sha256 pass is
        skipped when this store verified the version before and its files have not changed
        since (see the module docstring)."""
        folder = self.root / version
        if version_number(version) is None:
            raise SnapshotError(folder, "version", "not a snapshot folder name (vNNNNNN)")
        if not folder.is_dir():
            raise SnapshotError(folder, "folder", "does not exist")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise SnapshotError(folder, MANIFEST, "missing") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise SnapshotError(folder, MANIFEST, f"not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise SnapshotError(folder, MANIFEST, "not a JSON object")
        for field, kind in _REQUIRED.items():
            if field not in manifest:
                raise SnapshotError(folder, f"{MANIFEST}:{field}", "missing")
            if not isinstance(manifest[field], kind) or isinstance(manifest[field], bool):
                raise SnapshotError(folder, f"{MANIFEST}:{field}",
                                    f"expected {getattr(kind, '__name__', kind)}, "
                                    f"got {manifest[field]!r}")
        if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
            raise SnapshotError(folder, f"{MANIFEST}:format", f"unsupported format "
                                f"{manifest['format']!r} v{manifest['format_version']}")
        count, dim, dtype = manifest["count"], manifest["dim"], manifest["dtype"]
        if count < 1 or dim < 1:
            raise SnapshotError(folder, f"{MANIFEST}:count/dim", f"{count} x {dim}")
        if dtype not in DTYPES:
            raise SnapshotError(folder, f"{MANIFEST}:dtype", f"{dtype!r} not in {DTYPES}")
        if callable(expected_corpus_fingerprint):
            try:
                expected_corpus_fingerprint = expected_corpus_fingerprint(manifest)
            except FileNotFoundError as e:
                raise SnapshotError(folder, f"{MANIFEST}:extra.store_version",
                                    f"built from a corpus version that is gone ({e})") from None
        if (expected_corpus_fingerprint is not None
                and manifest["corpus_fingerprint"] != expected_corpus_fingerprint):
            raise SnapshotError(folder, f"{MANIFEST}:corpus_fingerprint",
                                f"{manifest['corpus_fingerprint']!r} does not match the "
                                f"corpus ({expected_corpus_fingerprint!r})")
        files = manifest["files"]
        for required in (EMBEDDINGS, IDS):
            if required not in files:
                raise SnapshotError(folder, f"{MANIFEST}:files", f"does not list {required}")
        if manifest["searcher"].get("scann") is not None and not any(
                rel.startswith(SCANN_DIR + "/") for rel in files):
            raise SnapshotError(folder, f"{MANIFEST}:files", "ScaNN settings but no files")
        states = []
        for rel, info in sorted(files.items()):
            path = folder / rel
            if not isinstance(info, dict) or not {"bytes", "sha256"} <= set(info):
                raise SnapshotError(folder, f"{MANIFEST}:files:{rel}", "needs bytes and sha256")
            if not path.is_file():
                raise SnapshotError(folder, rel, "missing")
            size = _size(path)
            if size != info["bytes"]:
                raise SnapshotError(folder, rel, f"{size} bytes, manifest says {info['bytes']}")
            states.append((rel, info["sha256"], _file_state(path)))
        states.append((MANIFEST, None, _file_state(folder / MANIFEST)))
        if self._verified.get(version) != tuple(states):
            self._verified.pop(version, None)
            for rel, sha256, _ in states[:-1]:
                if _sha256(folder / rel) != sha256:
                    raise SnapshotError(folder, rel, "sha256 does not match the manifest")
        _checked_npy(folder, EMBEDDINGS, (count, dim), storage_dtype(dtype))
        _checked_npy(folder, IDS, (count,), np.dtype(np.int64))
        self._verified[version] = tuple(states)
        return manifest

    def verified_embeddings(self, snapshot: Snapshot) -> np.ndarray:
        """`snapshot`'s embeddings read into memory (read-only), the bytes read checked
        against the manifest's sha256 (what a refresher reuses must be what was published,
        however long ago it was validated); SnapshotError when they are not."""
        shape, dtype = (snapshot.count, snapshot.dim), storage_dtype(snapshot.dtype)
        _checked_npy(snapshot.path, EMBEDDINGS, shape, dtype)
        data = (snapshot.path / EMBEDDINGS).read_bytes()
        if hashlib.sha256(data).hexdigest() != snapshot.manifest["files"][EMBEDDINGS]["sha256"]:
            self._verified.pop(snapshot.version, None)
            raise SnapshotError(snapshot.path, EMBEDDINGS, "sha256 does not match the manifest")
        # the published file, so its header and shape are the checked ones
        array = np.frombuffer(data, dtype, offset=len(data) - math.prod(shape) * dtype.itemsize)
        return from_storage(array.reshape(shape), snapshot.dtype)

    def load(self, version: str, *, validate: bool = True, checksums: bool = True,
             expected_corpus_fingerprint: CorpusCheck = None) -> Snapshot:
        """The snapshot in folder `version`, validated unless validate=False (`checksums`:
        ignored, kept for old callers: every load verifies, see `validate`)."""
        del checksums
        if validate:
            manifest = self.validate(version, expected_corpus_fingerprint)
        else:
            manifest = json.loads((self.root / version / MANIFEST).read_text())
        return Snapshot(self.root / version, manifest)

    def latest(self, *, validate: bool = True,
               expected_corpus_fingerprint: CorpusCheck = None) -> Snapshot | None:
        """The snapshot LATEST names (None if none yet); SnapshotError if it is invalid."""
        version = self.latest_version()
        if version is None:
            return None
        return self.load(version, validate=validate,
                         expected_corpus_fingerprint=expected_corpus_fingerprint)

    def latest_valid(self, expected_corpus_fingerprint: CorpusCheck = None,
                     checksums: bool = True,
                     log: logging.Logger | None = None) -> Snapshot | None:
        """LATEST's snapshot if valid, else the newest valid older one (each failure logged);
        None when no valid snapshot exists. `checksums`: ignored, kept for old callers."""
        del checksums
        log = log or logging.getLogger(__name__)
        try:
            first = self.latest_version()
        except SnapshotError as e:
            log.warning("%s", e)
            first = None
        candidates = [v for v in reversed(self.versions()) if v != first]
        if first is not None:
            newest = version_number(first)
            candidates = [first] + [v for v in candidates if version_number(v) < newest]
        for version in candidates:
            try:
                return self.load(version,
                                 expected_corpus_fingerprint=expected_corpus_fingerprint)
            except SnapshotError as e:
                log.warning("skipping invalid snapshot: %s", e)
        return None

    # ----------------------------------------------------------------- writing

    def publish(self, embeddings: Any, *, step: int, model_fingerprint: str,
                corpus_fingerprint: str, ids: Any = None, scann: Any = None,
                dtype: str | None = None, extra: dict[str, Any] | None = None,
                keep: int | None = None,
                on_stage: Callable[[str], None] | None = None) -> Snapshot:
        """Write a new snapshot and point LATEST at it; returns it.

        embeddings [N, P] (numpy or jax; stored as `dtype`, default its own: float32,
        float16 or bfloat16); ids [N] (default 0..N-1); scann: None/False (no ScaNN index),
        True or a ScannSettings (build one), or a built ScannSearcher over these rows.
        extra: any JSON-able facts for the manifest. Prunes to the last `keep` versions.
        on_stage(name) is called between steps (tests use it to see progress).
        """
        stage = on_stage or (lambda _: None)
        array = np.asarray(embeddings)
        dtype_name = dtype or array.dtype.name
        array = to_storage(array, dtype_name)
        if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
            raise ValueError(f"embeddings must be a non-empty [N, P] matrix, got {array.shape}")
        count, dim = array.shape
        ids_array = base.check_ids(ids, count)
        ids_array = np.arange(count, dtype=np.int64) if ids_array is None else ids_array
        bad = non_finite_rows(array, dtype_name)
        if len(bad):
            raise ValueError(f"refusing to publish step {step} to {self.root}: {len(bad)} "
                             f"embedding row(s) hold NaN or infinity (as {dtype_name}), "
                             f"rows {bad[:10].tolist()}, blocks {ids_array[bad[:10]].tolist()}"
                             f"{' ...' if len(bad) > 10 else ''}")
        searcher = self._scann_for(scann, embeddings, ids_array)

        self.root.mkdir(parents=True, exist_ok=True)
        self.cleanup()
        tmp = self.root / tmp_name("snapshot")
        tmp.mkdir()
        try:
            with naming_disk_full(tmp):
                stage("tmp_created")
                _write_npy(tmp / EMBEDDINGS, array)
                _write_npy(tmp / IDS, ids_array)
                stage("arrays_written")
                if searcher is not None:
                    self._write_scann(searcher, tmp / SCANN_DIR)
                    stage("scann_written")
                files = {}
                for rel, path in _walk_files(tmp):
                    fsync_file(path)
                    files[rel] = {"bytes": _size(path), "sha256": _sha256(path)}
                now = time.time()
                manifest = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                    "model_fingerprint": str(model_fingerprint),
                    "corpus_fingerprint": str(corpus_fingerprint),
                    "count": int(count), "dim": int(dim), "dtype": dtype_name,
                    "searcher": {"scann": None if searcher is None else searcher.settings},
                    "created": datetime.datetime.fromtimestamp(
                        now, datetime.timezone.utc).isoformat(),
                    "created_unix": now, "extra": dict(extra or {}), "files": files,
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                fsync_file(tmp / MANIFEST)
                if searcher is not None:
                    fsync_dir(tmp / SCANN_DIR)
                fsync_dir(tmp)
                stage("manifest_written")
                version = self._claim(tmp)
                stage("renamed")
                atomic_write(self.root / LATEST, lambda f: f.write(version + "\n"),
                             tmp_name=tmp_name("latest"))
                fsync_dir(self.root)
                stage("latest_updated")
                self.prune(keep)
                return Snapshot(self.root / version, manifest)
        finally:
            if tmp.exists():  # not renamed into place: a failure
                tmp.rmtree(missing_ok=True)

    def _scann_for(self, scann: Any, embeddings: Any, ids: np.ndarray):
        if scann is None or scann is False:
            return None
        from realm_jax.index.scann_searcher import ScannSearcher, ScannSettings
        if scann is True or isinstance(scann, ScannSettings):
            settings = None if scann is True else scann
            return ScannSearcher.build(np.asarray(embeddings, np.float32), ids, settings)
        if isinstance(scann, ScannSearcher):
            if scann.size != len(ids):
                raise ValueError(f"the ScaNN searcher holds {scann.size} vectors, the "
                                 f"embeddings {len(ids)}")
            return scann
        raise TypeError(f"scann must be None, a bool, ScannSettings or ScannSearcher, got "
                        f"{type(scann).__name__}")

    @staticmethod
    def _write_scann(searcher, folder: epath.Path) -> None:
        if is_local(folder):
            searcher.serialize(os.fspath(folder))
            return
        with tempfile.TemporaryDirectory() as local:
            searcher.serialize(local)
            _copy_tree(epath.Path(local), folder)

    def _claim(self, tmp: epath.Path) -> str:
        """Rename tmp to the next free version folder (a rename never replaces a non-empty
        folder, so concurrent publishers cannot both take the same name)."""
        names = self.versions()
        with contextlib.suppress(SnapshotError):  # LATEST may name a version gone since
            names.append(self.latest_version() or version_name(0))
        first = max(map(version_number, names), default=0) + 1
        for number in range(first, first + 100):
            target = self.root / version_name(number)
            if target.exists():
                continue
            try:
                tmp.rename(target)
            except OSError:
                continue
            fsync_dir(self.root)
            return target.name
        raise RuntimeError(f"could not claim a version folder under {self.root}")

    def prune(self, keep: int | None = None) -> list[str]:
        """Delete all but the newest `keep` versions (default self.keep), never the one
        LATEST names. A folder is first renamed to `.trash-*` (atomic), then deleted."""
        keep = self.keep if keep is None else keep
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        try:
            current = self.latest_version()
        except SnapshotError:
            return []  # do not delete anything while the pointer is unreadable
        versions = self.versions()
        return [v for v in versions[:max(0, len(versions) - keep)]
                if v != current and discard(self.root / v)]

    def cleanup(self) -> list[str]:
        """Remove leftovers of crashed publishers: `.trash-*` folders, and `.tmp-*` entries
        whose process is gone (same host) or that are older than an hour (other hosts)."""
        if not self.root.exists():
            return []
        removed = []
        host = socket.gethostname()
        for path in list(self.root.iterdir()):
            name = path.name
            if name.startswith(TMP_PREFIX):
                pid, owner = tmp_writer(name)
                if owner == host and pid > 0:
                    if process_alive(pid):  # (this process too)
                        continue
                else:
                    try:
                        age = time.time() - path.stat().mtime
                    except (OSError, AttributeError):
                        age = _STALE_REMOTE_TMP_S
                    if age < _STALE_REMOTE_TMP_S:
                        continue
            elif not name.startswith(TRASH_PREFIX):
                continue
            try:
                if path.is_dir():
                    path.rmtree(missing_ok=True)
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                continue
            removed.append(name)
        return removed


class SnapshotWatcher:
    """Follows LATEST for a trainer: `poll()` returns a newly published valid snapshot, or
    None when there is nothing new. A new snapshot that fails validation is logged once and
    refused; the watcher keeps serving `current`, the last good one.

    The first poll also falls back to the newest valid older snapshot when LATEST's is bad.
    """

    def __init__(self, store: IndexStore, *, expected_corpus_fingerprint: CorpusCheck = None,
                 log: logging.Logger | None = None):
        self.store = store
        self.expected_corpus_fingerprint = expected_corpus_fingerprint
        self.log = log or logging.getLogger(__name__)
        self.current: Snapshot | None = None
        self.rejected: dict[str, str] = {}

    def poll(self) -> Snapshot | None:
        if self.current is None:
            snapshot = self.store.latest_valid(self.expected_corpus_fingerprint, log=self.log)
        else:
            try:
                version = self.store.latest_version()
            except SnapshotError as e:
                return self._reject(LATEST, e)
            if version is None or version == self.current.version or version in self.rejected:
                return None
            try:
                snapshot = self.store.load(
                    version, expected_corpus_fingerprint=self.expected_corpus_fingerprint)
            except SnapshotError as e:
                return self._reject(version, e)
        if snapshot is not None:
            self.current = snapshot
            self.log.info("serving index snapshot %s (step %d)", snapshot.path, snapshot.step)
        return snapshot

    def _reject(self, version: str, error: SnapshotError) -> None:
        """Log a refused snapshot (once per version and error); poll then returns None."""
        if self.rejected.get(version) != str(error):
            self.log.warning("refusing index snapshot (still serving %s): %s",
                             self.current.path if self.current else None, error)
        self.rejected[version] = str(error)
