"""The corpus block store: a folder readable by random access without loading it all.

Layout (``FORMAT_VERSION`` 1)::

    manifest.json       count, settings, skipped counts, fingerprint, file list
    tokens.npy          all blocks' token ids, concatenated (uint16, or int32 for big vocabs)
    offsets.npy         int64 [N+1]: block i's tokens are tokens[offsets[i]:offsets[i+1]]
    lengths.npy         int32 [N]: tokens per block
    doc_index.npy       int64 [N]: ordinal of the block's source document; -1: a removed block
    records.jsonl       one JSON object per block: doc_id, title, text, spans [[start, end, target]]
    records_index.npy   int64 [N+1]: byte offsets of the lines in records.jsonl
    versions/           later versions made by `realm-jax corpus update` (absent until then):
      v000001/ ...        each a complete store folder of the layout above
      .lock, .tmp-*       the updater's lock; a version being written

Arrays are memory-mapped; a record is read with one ``pread``. A store folder is written
under a temporary name and renamed into place when complete.

Versions. The folder prepare-corpus writes is version 0; `update_corpus`
(realm_jax.data.corpus) writes version V+1 as a complete folder ``versions/vNNNNNN``: the
rename of that finished folder is the commit, so a killed update leaves the previous version
the newest one. ``BlockStore.open(root)`` opens the newest version, ``open(root, version=V)``
a given one; a store without ``versions/`` opens as before.

Block ids are stable across versions: ids are row positions, and a version keeps every row
of its parent. The blocks of a removed (or replaced) document become *removed blocks*
(no tokens, an empty record, ``doc_index`` -1), whose ids are never used again; the blocks of
new or replaced documents are appended after the last row. So an id names the same tokens
in every version where it is live (`BlockStore.live`), and a snapshot built from an older
version can reuse its embeddings by id. Ids only grow; preparing the corpus anew compacts
them (and needs a full refresh). Documents keep their ordinal when replaced; new documents
take the next free ordinal. Version 0 is never pruned; later versions are pruned by
`prune_versions`, which keeps the newest and the ones named (the index snapshots' versions).
"""

from __future__ import annotations

import array
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from realm_jax.data.wikitext import Span
from realm_jax.durable import (discard, fsync_dir, fsync_file, naming_disk_full,
                               replace_folder)

_log = logging.getLogger(__name__)

FORMAT = "realm_jax.block_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FILES = ("tokens.npy", "offsets.npy", "lengths.npy", "doc_index.npy", "records.jsonl",
          "records_index.npy")
_TOKEN_CHUNK = 1 << 24  # tokens checked at a time when a store is opened
VERSIONS_DIR = "versions"
UPDATE_LOCK = ".lock"
_VERSION_RE = re.compile(r"^v(\d{6,})$")
REMOVED_RECORD = {"doc_id": "", "title": "", "text": "", "spans": [], "removed": True}


def version_name(number: int) -> str:
    """The folder name of a version, `vNNNNNN` (index snapshots are named the same way)."""
    return f"v{int(number):06d}"


def version_number(name: str) -> int | None:
    match = _VERSION_RE.match(name)
    return int(match.group(1)) if match else None


def version_folder(root: str | os.PathLike, version: int) -> Path:
    """Where version `version` of the store at `root` lives (0: `root` itself)."""
    root = Path(root)
    return root if version == 0 else root / VERSIONS_DIR / version_name(version)


def version_entries(folder: Any) -> list[str]:
    """The `vNNNNNN` entries of `folder` (a pathlib or etils path), oldest first; none when
    it is absent. (Both versioned stores, blocks and index snapshots, use it.)"""
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if version_number(p.name) is not None]
    return sorted(names, key=version_number)


def store_versions(root: str | os.PathLike) -> list[int]:
    """The complete versions of the store at `root`, oldest first (0 is `root` itself)."""
    folder = Path(root) / VERSIONS_DIR
    return [0] + [version_number(name) for name in version_entries(folder)
                  if (folder / name / MANIFEST).is_file()]


def version_fingerprint(root: str | os.PathLike, version: int) -> str:
    """The fingerprint of version `version` of the store at `root`, from its manifest alone;
    FileNotFoundError naming the versions there when it is gone (pruned) or never existed."""
    path = version_folder(root, version) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise _version_gone(root, version) from None
    return str(manifest["fingerprint"])


def _version_gone(root: str | os.PathLike, version: int) -> FileNotFoundError:
    return FileNotFoundError(f"block store {root}: version {version} is not there (pruned, or "
                             f"never made); it has versions {store_versions(root)}")


def prune_versions(root: str | os.PathLike, keep: Sequence[int] | set[int] = ()) -> list[int]:
    """Delete the versions of the store at `root` that are neither the newest, nor version 0,
    nor in `keep` (the versions index snapshots were built from); returns those deleted. A
    folder is renamed first (atomic), then deleted."""
    versions = store_versions(root)
    keep = set(int(v) for v in keep) | {0, versions[-1]}
    removed = [v for v in versions if v not in keep and discard(version_folder(root, v))]
    if removed:
        _log.info("pruned version(s) %s of block store %s", removed, root)
    return removed


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise FileExistsError unless `path` is absent or a folder whose manifest says it is a
    block store: `overwrite` never deletes anything else (a user's folder, an input file)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if path.exists() and not (isinstance(manifest, dict) and manifest.get("format") == FORMAT):
        raise FileExistsError(errno.EEXIST, f"refusing to replace {path}: it is not a block "
                              f"store (no {MANIFEST} of format {FORMAT!r}); remove it yourself "
                              "or choose another output folder", os.fspath(path))


@dataclasses.dataclass(frozen=True)
class BlockRecord:
    """Everything stored about one block."""

    block_id: int
    doc_id: str
    title: str
    text: str
    spans: list[Span]
    tokens: np.ndarray
    doc_index: int


class BlockStoreWriter:
    """Appends blocks to a temporary folder; :meth:`finish` validates and renames it into place.

    Use as a context manager: leaving the ``with`` block by an exception removes the temporary
    folder, so the final path only ever holds a complete store.
    """

    def __init__(self, path: str | os.PathLike, *, token_dtype: np.dtype | type,
                 settings: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"block store already exists: {self.path} "
                                  "(pass overwrite=True to replace it)")
        check_replaceable(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._overwrite = overwrite
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        self._tmp.mkdir()
        self.token_dtype = np.dtype(token_dtype).newbyteorder("<")
        self.settings = dict(settings)
        self._hash = hashlib.sha256(json.dumps(
            {"format": FORMAT, "version": FORMAT_VERSION, "token_dtype": self.token_dtype.str,
             "settings": self.settings}, sort_keys=True).encode())
        self._tokens = open(self._tmp / "tokens.npy", "wb")
        self._write_npy_header(0)
        self._records = open(self._tmp / "records.jsonl", "wb")
        self._offsets = array.array("q", [0])
        self._record_index = array.array("q", [0])
        self._doc_index = array.array("q")
        self._finished = False

    def __len__(self) -> int:
        return len(self._doc_index)

    def _write_npy_header(self, count: int) -> None:
        self._tokens.seek(0)
        np.lib.format.write_array_header_1_0(self._tokens, {
            "descr": self.token_dtype.str, "fortran_order": False, "shape": (count,)})
        if self._tokens.tell() != 128:  # a 1-D header always pads to 128 bytes
            raise RuntimeError(f"unexpected .npy header size {self._tokens.tell()}")

    def add(self, tokens: np.ndarray, *, doc_id: str, title: str, text: str,
            spans: Sequence[Span], doc_index: int) -> int:
        """Appends one block and returns its id."""
        return self._append(tokens, _record_line({"doc_id": doc_id, "title": title, "text": text,
                                                  "spans": [list(s) for s in spans]}), doc_index)

    def _append(self, tokens: np.ndarray, line: bytes, doc_index: int) -> int:
        toks = np.ascontiguousarray(tokens, dtype=self.token_dtype)
        raw = toks.tobytes()
        self._hash.update(struct.pack("<QQ", len(toks), len(line)))
        self._hash.update(raw)
        self._hash.update(line)
        with naming_disk_full(self._tmp):
            self._tokens.write(raw)
            self._records.write(line)
        self._offsets.append(self._offsets[-1] + len(toks))
        self._record_index.append(self._record_index[-1] + len(line))
        self._doc_index.append(doc_index)
        return len(self._doc_index) - 1

    def add_removed(self) -> int:
        """Appends a removed block (no tokens, an empty record, doc_index -1)."""
        return self._append(np.zeros(0, self.token_dtype), _record_line(REMOVED_RECORD), -1)

    def copy_block(self, store: BlockStore, i: int) -> int:
        """Appends block `i` of `store` unchanged (its stored bytes; the same fingerprint
        contribution as adding it anew)."""
        i = store._check_id(i)
        start, end = int(store._record_index[i]), int(store._record_index[i + 1])
        return self._append(store.tokens(i), os.pread(store._fd, end - start, start),
                            int(store.doc_index[i]))

    def finish(self, manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Writes the index arrays and the manifest, then renames the folder into place."""
        with naming_disk_full(self._tmp):
            return self._finish(manifest_extra)

    def _finish(self, manifest_extra: dict[str, Any] | None) -> dict[str, Any]:
        count = len(self._doc_index)
        self._write_npy_header(self._offsets[-1])
        for f in (self._tokens, self._records):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        offsets = np.frombuffer(self._offsets, dtype=np.int64)
        np.save(self._tmp / "offsets.npy", offsets)
        np.save(self._tmp / "lengths.npy", np.diff(offsets).astype(np.int32))
        np.save(self._tmp / "doc_index.npy", np.frombuffer(self._doc_index, dtype=np.int64))
        np.save(self._tmp / "records_index.npy", np.frombuffer(self._record_index, dtype=np.int64))
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "count": count,
            "num_documents": len({d for d in self._doc_index if d >= 0}),
            "num_tokens": int(self._offsets[-1]), "token_dtype": self.token_dtype.name,
            "settings": self.settings, **(manifest_extra or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": list(_FILES), "fingerprint": self._hash.hexdigest(),
        }
        (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        for name in _FILES[1:4] + _FILES[5:] + (MANIFEST,):
            fsync_file(self._tmp / name)
        fsync_dir(self._tmp)
        BlockStore(self._tmp).close()  # validate before publishing
        if self.path.exists():
            if not self._overwrite:
                raise FileExistsError(f"block store appeared while writing: {self.path}")
            check_replaceable(self.path)
        replace_folder(self._tmp, self.path)
        self._finished = True
        return manifest

    def abort(self) -> None:
        """Removes the temporary folder (idempotent)."""
        for f in (self._tokens, self._records):
            if not f.closed:
                f.close()
        if not self._finished:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> BlockStoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()


def _record_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


class BlockStore:
    """Read access to a block store folder; arrays are memory-mapped, records read on demand.

    Opening checks the files against the manifest and, with `check_tokens`, every token id
    against the vocabulary size the manifest records (stores made before it was recorded are
    not checked): one pass over the token file. Safe to pickle (reopens by path, without the
    token pass, which the original has made) for data-loader workers.
    """

    def __init__(self, path: str | os.PathLike, check_tokens: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"not a block store (no {MANIFEST}): {self.path}")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: unsupported store format "
                             f"{self.manifest.get('format')!r} v{self.manifest.get('version')}")
        for name in _FILES:
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"block store {self.path} is missing {name}")
        self._tokens = self._load("tokens.npy")
        self._offsets = self._load("offsets.npy")
        self.lengths: np.ndarray = self._load("lengths.npy")
        self.doc_index: np.ndarray = self._load("doc_index.npy")
        self._record_index = self._load("records_index.npy")
        self._fd = os.open(self.path / "records.jsonl", os.O_RDONLY)
        self.version: int = int(self.manifest.get("store_version", 0))
        self.root: Path = self.path.parent.parent if self.version else self.path
        self._check()
        if check_tokens:
            self._check_tokens()

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.path / name, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ValueError(f"corrupt block store {self.path}: cannot map {name}: {e}") from e

    def _check(self) -> None:
        n = self.manifest["count"]
        problems = []
        if len(self._offsets) != n + 1 or len(self._record_index) != n + 1:
            problems.append("index lengths do not match the count")
        elif int(self._offsets[-1]) != len(self._tokens):
            problems.append(f"offsets end at {int(self._offsets[-1])}, tokens has "
                            f"{len(self._tokens)}")
        elif int(self._record_index[-1]) != os.fstat(self._fd).st_size:
            problems.append("records.jsonl size does not match its index")
        if len(self.lengths) != n or len(self.doc_index) != n:
            problems.append("lengths/doc_index do not match the count")
        if self._tokens.dtype != np.dtype(self.manifest["token_dtype"]):
            problems.append(f"tokens dtype {self._tokens.dtype} != {self.manifest['token_dtype']}")
        if problems:
            self.close()
            raise ValueError(f"corrupt block store {self.path}: {'; '.join(problems)}")

    def _check_tokens(self) -> None:
        """Every token id < the recorded vocabulary size (a store written with another
        tokenizer, or damaged on disk, would otherwise index past the embedding table)."""
        vocab = self.settings.get("tokenizer", {}).get("vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool):
            return
        for start in range(0, len(self._tokens), _TOKEN_CHUNK):
            chunk = np.asarray(self._tokens[start:start + _TOKEN_CHUNK])
            bad = np.flatnonzero((chunk >= vocab) | (chunk < 0))
            if len(bad):
                position = start + int(bad[0])
                block = int(np.searchsorted(self._offsets, position, side="right")) - 1
                self.close()
                raise ValueError(
                    f"corrupt block store {self.path}: tokens.npy holds id {int(chunk[bad[0]])} "
                    f"(block {block}), outside the vocabulary of {vocab} ids recorded in "
                    f"{MANIFEST} (settings.tokenizer.vocab_size)")

    @classmethod
    def open(cls, path: str | os.PathLike, version: int | None = None) -> BlockStore:
        """Opens the newest version of the store at `path` (written by
        :func:`realm_jax.data.prepare_corpus`, updated by `update_corpus`), or `version`.
        FileNotFoundError names the versions there when `version` is not among them (pruned,
        or never made)."""
        if not (Path(path) / MANIFEST).is_file():
            return cls(path)  # (its own error)
        versions = store_versions(path)
        if version is None:  # (a version folder given itself has no versions/: opened as is)
            return cls(version_folder(path, versions[-1]))
        if int(version) not in versions:
            raise _version_gone(path, version)
        store = cls(version_folder(path, int(version)))
        if store.version != int(version):
            store.close()
            raise ValueError(f"{version_folder(path, int(version)) / MANIFEST}: store_version "
                             f"{store.version}, expected {version}")
        return store

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _check_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"block id {i} out of range [0, {len(self)}) in {self.path}")
        return i

    @property
    def fingerprint(self) -> str:
        """sha256 over the settings and every block's tokens and record (stable across runs)."""
        return self.manifest["fingerprint"]

    @property
    def live(self) -> np.ndarray:
        """bool [N]: which block ids hold a block (removed blocks do not)."""
        return np.asarray(self.doc_index) >= 0

    def live_ids(self) -> np.ndarray:
        """The ids of the blocks not removed, ascending (all ids of a store never updated)."""
        return np.flatnonzero(self.live).astype(np.int64)

    @property
    def settings(self) -> dict[str, Any]:
        """How the store was made (mode, limits, tokenizer)."""
        return self.manifest["settings"]

    def check_tokenizer(self, tokenizer: Any, vocab_hash: str) -> None:
        """ValueError unless `vocab_hash` is the one of the tokenizer the store was made
        with (`tokenizer`: what the message calls it); a store recording none takes any."""
        want = self.settings.get("tokenizer", {})
        if want.get("vocab_hash") and want["vocab_hash"] != vocab_hash:
            raise ValueError(f"tokenizer {tokenizer} is not the one block store {self.root} "
                             f"was made with ({want.get('name')!r}): vocab differs")

    @property
    def token_dtype(self) -> np.dtype:
        return self._tokens.dtype

    def tokens(self, i: int) -> np.ndarray:
        """Block ``i``'s token ids (no special tokens), a copy in the store's dtype."""
        i = self._check_id(i)
        return np.array(self._tokens[self._offsets[i]:self._offsets[i + 1]])

    def tokens_batch(self, ids: Sequence[int] | np.ndarray, *, max_length: int | None = None,
                     pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Blocks ``ids`` as an int32 [B, L] matrix padded with ``pad_id`` and their lengths.

        L is the longest block (or ``max_length``; longer blocks are truncated).
        """
        ids = [self._check_id(i) for i in np.asarray(ids).reshape(-1).tolist()]
        lengths = np.asarray(self.lengths[np.asarray(ids, dtype=np.int64)], dtype=np.int32)
        if max_length is not None:
            lengths = np.minimum(lengths, max_length)
        width = int(max_length if max_length is not None else (lengths.max() if ids else 0))
        out = np.full((len(ids), width), pad_id, dtype=np.int32)
        for row, (i, n) in enumerate(zip(ids, lengths.tolist())):
            start = int(self._offsets[i])
            out[row, :n] = self._tokens[start:start + n]
        return out, lengths

    def _record(self, i: int) -> dict[str, Any]:
        i = self._check_id(i)
        start, end = int(self._record_index[i]), int(self._record_index[i + 1])
        return json.loads(os.pread(self._fd, end - start, start))

    def text(self, i: int) -> str:
        return self._record(i)["text"]

    def title(self, i: int) -> str:
        return self._record(i)["title"]

    def doc_id(self, i: int) -> str:
        """The id of the source document (as given by the corpus)."""
        return self._record(i)["doc_id"]

    def spans(self, i: int) -> list[Span]:
        """Entity spans (link anchors) relative to ``text(i)``."""
        return [Span(*s) for s in self._record(i)["spans"]]

    def record(self, i: int) -> BlockRecord:
        """Everything about block ``i`` with a single read."""
        r = self._record(i)
        return BlockRecord(int(i), r["doc_id"], r["title"], r["text"],
                           [Span(*s) for s in r["spans"]], self.tokens(i), int(self.doc_index[i]))

    def close(self, _os_close=os.close) -> None:
        # (os.close bound at definition: __del__ may run at interpreter exit, after `os` is
        # torn down)
        if getattr(self, "_fd", None) is not None:
            _os_close(self._fd)
            self._fd = None

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], check_tokens=False)

    def __repr__(self) -> str:
        return (f"BlockStore({str(self.root)!r}, version={self.version}, count={len(self)}, "
                f"mode={self.settings.get('mode')})")
