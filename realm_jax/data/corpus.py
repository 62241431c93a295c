"""``prepare_corpus``: read a corpus, split it into blocks, tokenize, write a block store.
``update_corpus``: add, replace and remove documents of a store as a new store version (see
realm_jax.data.store for versions and how block ids stay stable)."""

from __future__ import annotations

import array
import dataclasses
import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from realm_jax.data.blocks import MODES, Mode, load_tokenizer, spans_in, split_document
from realm_jax.data.readers import (Document, SkipCounter, batched, detect_format,
                                    read_documents)
from realm_jax.data.store import (UPDATE_LOCK, VERSIONS_DIR, BlockStore, BlockStoreWriter,
                                  check_replaceable, version_folder)
from realm_jax.durable import TRASH_PREFIX, ProcessLock

_log = logging.getLogger(__name__)

# Bump when block splitting changes, so old stores get a different fingerprint.
SPLITTER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_corpus` wrote."""

    path: Path
    num_documents: int
    num_blocks: int
    num_tokens: int
    skipped: dict[str, int]
    spans_cut: int
    fingerprint: str
    seconds: float
    manifest: dict[str, Any]


def _prefetch(items: Iterable[Any], size: int) -> Iterator[Any]:
    """Iterates ``items`` in a background thread (reading overlaps tokenization, which releases
    the GIL); exceptions are re-raised here, and closing the generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
        except BaseException as e:  # handed to the consumer
            put((e, None))
            return
        put((None, done))

    thread = threading.Thread(target=work, name="corpus-reader", daemon=True)
    thread.start()
    try:
        while True:
            error, item = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _check_output_outside_input(source: str | os.PathLike, output_dir: str | os.PathLike
                                ) -> None:
    """`output_dir` must neither be the input nor hold it: replacing it would delete it."""
    src, out = Path(source).resolve(), Path(output_dir).resolve()
    if src == out or out in src.parents:
        raise ValueError(f"the output folder {output_dir} holds the input {source}; write the "
                         "block store to another folder")


@dataclasses.dataclass(frozen=True)
class _Block:
    tokens: np.ndarray
    text: str
    spans: list
    spans_cut: int


def _document_blocks(docs: list[Document], tok: Any, settings: dict[str, Any],
                     skips: SkipCounter, label: str) -> list[tuple[Document, list[_Block]]]:
    """(document, its blocks) of the documents that have tokens (the others are counted in
    `skips`), split as `settings` say (the store's: mode, max_tokens or passage_words)."""
    out = []
    for doc, enc in zip(docs, tok.encode_batch([d.text for d in docs])):
        pieces = [p for p in split_document(doc.text, enc, mode=settings["mode"],
                                            max_tokens=settings.get("max_tokens", 288),
                                            passage_words=settings.get("passage_words", 100),
                                            spans=doc.spans)
                  if p.tok_end > p.tok_start]
        if not pieces:
            skips.skip("no_tokens", f"{label} document {doc.doc_id!r}")
            continue
        ids = np.asarray(enc.ids, dtype=np.int64)
        blocks = []
        for piece in pieces:
            spans, cut = spans_in(doc.spans, piece)
            blocks.append(_Block(ids[piece.tok_start:piece.tok_end],
                                 doc.text[piece.char_start:piece.char_end], spans, cut))
        out.append((doc, blocks))
    return out


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(),
                          "little")


def _repeated_ids(id_hashes: array.array) -> tuple[int, int]:
    """(documents whose id an earlier document has, ordinal of the first such earlier
    document, or -1)."""
    hashes = np.frombuffer(id_hashes, dtype=np.uint64)
    unique, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    repeated = first[counts > 1]
    return len(hashes) - len(unique), int(repeated.min()) if len(repeated) else -1


def prepare_corpus(source: str | os.PathLike | Iterable[Document], output_dir: str | os.PathLike, *,
                   tokenizer: str | os.PathLike | Any, mode: Mode = "realm",
                   input_format: str | None = None, max_tokens: int = 288,
                   passage_words: int = 100, tfds_split: str = "train",
                   tfds_data_dir: str | os.PathLike | None = None, id_field: str | None = "id",
                   title_field: str = "title", text_field: str = "text",
                   max_documents: int | None = None, overwrite: bool = False,
                   batch_documents: int = 64, progress: bool = True) -> PrepareResult:
    """Builds a block store at ``output_dir`` from a corpus.

    Args:
      source: a ``.jsonl[.gz]`` file (``id``, ``title``, ``text`` per line), a MediaWiki XML
        dump (``.xml`` / ``.xml.bz2``), ``tfds:NAME`` (a prepared TFDS dataset), or an
        iterable of :class:`Document` (already read; the caller counts what it skipped).
      output_dir: the store folder; written under a temporary name, then renamed.
      tokenizer: a local Hugging Face folder (or a loaded fast tokenizer).
      mode: ``"realm"``: blocks of at most ``max_tokens`` wordpieces, packed by sentences;
        ``"dpr"``: passages of ``passage_words`` whitespace words, each with its title.
      input_format: ``"jsonl"``, ``"tfds"`` or ``"wiki_xml"``; guessed from ``source`` if None.
      tfds_split, tfds_data_dir: where the TFDS dataset lives (never downloaded).
      id_field, title_field, text_field: record fields for JSONL and TFDS; ``id_field=None``
        numbers documents by line / record index.
      max_documents: stop after this many usable documents (for quick runs).
      overwrite: replace an existing block store at ``output_dir`` (anything else there is
        refused, and so is an ``output_dir`` holding the input).
      batch_documents: documents tokenized per batch.
      progress: show a progress bar (docs/s).

    Returns:
      A :class:`PrepareResult`; ``skipped`` counts skipped items by reason (also in the
      manifest and logged). Documents that repeat an earlier document's id are kept (each
      is its own document: REALM excludes a query's source by document ordinal, not id),
      counted in the manifest's ``stats.duplicate_doc_ids`` and warned about.

    Raises:
      FileNotFoundError: the input file, TFDS dataset or tokenizer folder is missing.
      FileExistsError: ``output_dir`` exists and ``overwrite`` is False, or it is not a block
        store.
      ValueError: bad settings, ``output_dir`` holds the input, or no usable document.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if max_tokens < 1 or passage_words < 1:
        raise ValueError(f"max_tokens and passage_words must be positive, got {max_tokens} "
                         f"and {passage_words}")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive (or None: all), got {max_documents}")
    started = time.perf_counter()
    skips = SkipCounter()
    if isinstance(source, (str, os.PathLike)) and not os.fspath(source).startswith("tfds:"):
        _check_output_outside_input(source, output_dir)
    if overwrite:
        check_replaceable(output_dir)
    if isinstance(source, (str, os.PathLike)):
        fmt = input_format or detect_format(source)
        documents: Iterable[Document] = read_documents(
            source, skips, fmt=fmt, tfds_split=tfds_split, tfds_data_dir=tfds_data_dir,
            id_field=id_field, title_field=title_field, text_field=text_field)
        label = os.fspath(source)
    else:
        fmt, documents, label = "documents", source, "<documents>"
    tok = load_tokenizer(tokenizer)
    settings: dict[str, Any] = {
        "mode": mode, "splitter_version": SPLITTER_VERSION,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size,
                      "vocab_hash": tok.vocab_hash},
    }
    settings.update({"max_tokens": max_tokens} if mode == "realm" else
                    {"passage_words": passage_words})
    source_info = {"path": label, "format": fmt}
    if fmt == "tfds":
        source_info.update(split=tfds_split, data_dir=None if tfds_data_dir is None
                           else os.fspath(tfds_data_dir))

    total = len(documents) if hasattr(documents, "__len__") else None
    if max_documents is not None:
        total = max_documents if total is None else min(total, max_documents)
    counts = {"documents": 0, "spans_cut": 0}
    id_hashes = array.array("Q")  # 8 bytes per document, to count repeated ids at the end
    with BlockStoreWriter(output_dir, token_dtype=tok.token_dtype, settings=settings,
                          overwrite=overwrite) as writer, \
            tqdm(desc=f"prepare-corpus {Path(label).name}", unit="docs",
                 total=total, disable=not progress) as bar:

        def flush(batch: list[Document]) -> None:
            for doc, blocks in _document_blocks(batch, tok, settings, skips, label):
                for block in blocks:
                    counts["spans_cut"] += block.spans_cut
                    writer.add(block.tokens, doc_id=doc.doc_id, title=doc.title,
                               text=block.text, spans=block.spans,
                               doc_index=counts["documents"])
                counts["documents"] += 1
                id_hashes.append(_id_hash(doc.doc_id))
            bar.update(len(batch))
            bar.set_postfix(blocks=len(writer), skipped=sum(skips.counts.values()),
                            refresh=False)

        # not bound to a name: the reader thread stops once the loop drops the iterators
        for batch in batched(itertools.islice(_prefetch(documents, 4 * batch_documents),
                                              max_documents), batch_documents):
            flush(batch)
        if len(writer) == 0:
            raise ValueError(f"no usable documents in {source_info['path']}: "
                             f"skipped {skips.as_dict() or 'nothing (the corpus is empty)'}")
        duplicates, first_repeated = _repeated_ids(id_hashes)
        tokenizer_path = ({"tokenizer_path": os.path.abspath(os.fspath(tokenizer))}
                          if isinstance(tokenizer, (str, os.PathLike)) else {})
        manifest = writer.finish({
            "source": source_info, "skipped": skips.as_dict(), **tokenizer_path,
            "stats": {"spans_cut": counts["spans_cut"], "duplicate_doc_ids": duplicates},
        })
    if duplicates:
        with BlockStore(output_dir, check_tokens=False) as store:
            example = store.doc_id(int(np.searchsorted(store.doc_index, first_repeated)))
        _log.warning("%s: %d document(s) repeat the id of an earlier one (e.g. %r); kept as "
                     "separate documents, counted in %s stats.duplicate_doc_ids",
                     source_info["path"], duplicates, example,
                     Path(output_dir) / "manifest.json")
    seconds = time.perf_counter() - started
    result = PrepareResult(Path(output_dir), manifest["num_documents"], manifest["count"],
                           manifest["num_tokens"], skips.as_dict(), counts["spans_cut"],
                           manifest["fingerprint"], seconds, manifest)
    _log.info("prepared %d blocks (%d tokens) from %d documents of %s in %.1fs; skipped: %s",
              result.num_blocks, result.num_tokens, result.num_documents, source_info["path"],
              seconds, result.skipped or "none")
    return result


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    """What :func:`update_corpus` did. `documents`: added, removed, replaced, unchanged;
    `blocks`: added (of new documents), removed (of removed documents), replaced_old /
    replaced_new (of replaced documents: the removed and the appended blocks), unchanged
    (live blocks kept with their ids). `version` is the parent's when nothing changed."""

    root: Path
    version: int
    parent_version: int
    documents: dict[str, int]
    blocks: dict[str, int]
    missing: list[str]
    skipped: dict[str, int]
    fingerprint: str
    seconds: float

    @property
    def changed(self) -> bool:
        return self.version != self.parent_version

    def summary(self) -> str:
        d, b = self.documents, self.blocks
        head = (f"block store {self.root}: version {self.parent_version} -> {self.version} "
                f"(fingerprint {self.fingerprint[:16]})" if self.changed else
                f"block store {self.root}: nothing changed; still version {self.version}")
        lines = [head,
                 f"documents: {d['added']} added, {d['removed']} removed, {d['replaced']} "
                 f"replaced, {d['unchanged']} unchanged",
                 f"blocks: {b['added']} added, {b['removed']} removed, {b['replaced_old']} "
                 f"replaced by {b['replaced_new']}, {b['unchanged']} unchanged"]
        if self.missing:
            shown = ", ".join(repr(m) for m in self.missing[:5])
            lines.append(f"not in the store (nothing removed): {len(self.missing)} id(s): "
                         f"{shown}{' ...' if len(self.missing) > 5 else ''}")
        if self.skipped:
            lines.append(f"skipped: {self.skipped}")
        return "\n".join(lines)


def read_ids(path: str | os.PathLike) -> list[str]:
    """Document ids, one per line (blank lines ignored), in file order without repeats."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"--remove {path}: no such file (one document id per line)"
                                ) from None
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def _documents(store: BlockStore) -> dict[str, tuple[int, list[int]]]:
    """doc_id -> (its first ordinal, the ids of its live blocks), one record read per
    document (blocks of one ordinal share the doc_id)."""
    live = store.live_ids()
    ordinals = np.asarray(store.doc_index[live])
    order = np.argsort(ordinals, kind="stable")
    unique, starts = np.unique(ordinals[order], return_index=True)
    docs: dict[str, tuple[int, list[int]]] = {}
    for ordinal, ids in zip(unique.tolist(), np.split(live[order], starts[1:])):
        entry = docs.setdefault(store.doc_id(int(ids[0])), (ordinal, []))
        entry[1].extend(ids.tolist())
    return docs


def _same_blocks(store: BlockStore, ids: list[int], doc: Document, blocks: list[_Block]) -> bool:
    """Whether document `doc` split into `blocks` is what blocks `ids` of `store` hold."""
    if len(ids) != len(blocks):
        return False
    for i, block in zip(ids, blocks):
        record = store.record(i)
        if (record.title != doc.title or record.text != block.text
                or [tuple(s) for s in record.spans] != [tuple(s) for s in block.spans]
                or not np.array_equal(record.tokens.astype(np.int64), block.tokens)):
            return False
    return True


def _remove_leftovers(folder: Path) -> None:
    """Temporary and trash folders of killed updates and prunes (the caller holds the lock)."""
    import shutil
    for child in folder.iterdir():
        if child.name.startswith(TRASH_PREFIX) or (child.name.startswith(".v")
                                                   and ".tmp-" in child.name):
            shutil.rmtree(child, ignore_errors=True)


def update_corpus(store: str | os.PathLike, *, add: str | os.PathLike | Iterable[Document] |
                  None = None, remove: str | os.PathLike | Iterable[str] | None = None,
                  tokenizer: str | os.PathLike | Any | None = None,
                  batch_documents: int = 64, replace_all: bool = False) -> UpdateResult:
    """Writes the next version of the block store at `store`: the newest version with the
    documents of `add` (a JSONL file as for prepare_corpus, or Documents) added, or
    replacing the document of the same id, and the documents `remove` names (an ids file,
    one per line, or ids) removed. Block ids of unchanged documents stay; see
    realm_jax.data.store. A replacement identical to the stored document changes nothing;
    when nothing changes, no version is written.

    `replace_all`: `add` is the whole new corpus (any format prepare_corpus reads, e.g. a
    newer Wikipedia dump; `remove` not given): the stored documents it lacks are removed, the
    others added, replaced or kept with their block ids, as one version.

    `tokenizer`: the HF folder the store was made with (default: the one its manifest
    records). One update at a time per store (a lock); the new version appears only once
    complete (a killed update leaves the previous version the newest)."""
    started = time.perf_counter()
    root = Path(store)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"--store {root}: not a block store (make one with "
                                "`realm-jax prepare-corpus`)")
    versions_dir = root / VERSIONS_DIR
    lock = ProcessLock.acquire(versions_dir / UPDATE_LOCK, "corpus update")
    try:
        _remove_leftovers(versions_dir)
        with BlockStore.open(root) as base:
            if replace_all:
                add, remove = _whole_corpus(base, add, remove)
            return _update(base, root, add, remove, tokenizer, batch_documents, started)
    finally:
        lock.release()


def _whole_corpus(base: BlockStore, corpus, remove) -> tuple[list[Document], list[str]]:
    """(documents, ids to remove) of an update that makes `corpus` the store's whole
    content: its documents, and the ids of the stored documents it lacks."""
    if remove is not None:
        raise ValueError("corpus update --replace_all: the new corpus says what is removed; "
                         "give no --remove")
    if corpus is None:
        raise ValueError("corpus update --replace_all: give the new corpus")
    skips = SkipCounter()
    docs = list(read_documents(corpus, skips) if isinstance(corpus, (str, os.PathLike))
                else corpus)
    if skips.as_dict():
        _log.info("%s: skipped %s", os.fspath(corpus), skips.as_dict())
    kept = {d.doc_id for d in docs}
    return docs, [doc_id for doc_id in _documents(base) if doc_id not in kept]


def _update(base: BlockStore, root: Path, add, remove, tokenizer, batch_documents: int,
            started: float) -> UpdateResult:
    skips = SkipCounter()
    label = os.fspath(add) if isinstance(add, (str, os.PathLike)) else "<documents>"
    if isinstance(add, (str, os.PathLike)):
        add = read_documents(add, skips, fmt="jsonl")
    adds: dict[str, Document] = {}
    for doc in add or ():
        if doc.doc_id in adds:
            _log.warning("%s: document %r given twice; the last one is kept", label, doc.doc_id)
        adds[doc.doc_id] = doc
    removes = read_ids(remove) if isinstance(remove, (str, os.PathLike)) else \
        list(dict.fromkeys(remove or ()))
    both = [i for i in removes if i in adds]
    if both:
        raise ValueError(f"document(s) {both[:5]} are both added ({label}) and removed "
                         f"({remove}): give each id once")
    docs = _documents(base)
    documents = dict.fromkeys(("added", "removed", "replaced", "unchanged"), 0)
    blocks = dict.fromkeys(("added", "removed", "replaced_old", "replaced_new", "unchanged"), 0)
    missing = [i for i in removes if i not in docs]
    dropped = [docs[i][1] for i in removes if i in docs]   # each document's own block ids
    removed = {block for ids in dropped for block in ids}
    documents["removed"], blocks["removed"] = len(dropped), len(removed)
    appended: list[tuple[Document, list[_Block], int]] = []
    if adds:
        tok = _store_tokenizer(base, tokenizer)
        next_ordinal = int(np.max(base.doc_index, initial=-1)) + 1
        for chunk in batched(adds.values(), batch_documents):
            for doc, doc_blocks in _document_blocks(chunk, tok, base.settings, skips, label):
                old = docs.get(doc.doc_id)
                if old is None:
                    appended.append((doc, doc_blocks, next_ordinal))
                    next_ordinal += 1
                    documents["added"] += 1
                    blocks["added"] += len(doc_blocks)
                elif not _same_blocks(base, old[1], doc, doc_blocks):
                    removed.update(old[1])
                    appended.append((doc, doc_blocks, old[0]))
                    documents["replaced"] += 1
                    blocks["replaced_old"] += len(old[1])
                    blocks["replaced_new"] += len(doc_blocks)
    touched = documents["removed"] + documents["replaced"]
    documents["unchanged"] = len(docs) - touched
    blocks["unchanged"] = int(base.live.sum()) - len(removed)
    version = base.version + 1 if appended or removed else base.version
    fingerprint = base.fingerprint
    if version != base.version:
        fingerprint = _write_version(base, root, version, removed, appended, {
            "documents": documents, "blocks": blocks, "missing": len(missing),
            "add": label if adds else None,
            "remove": os.fspath(remove) if isinstance(remove, (str, os.PathLike)) else None})
    result = UpdateResult(root, version, base.version, documents, blocks, missing,
                          skips.as_dict(), fingerprint, time.perf_counter() - started)
    _log.info("%s", result.summary().replace("\n", "; "))
    return result


def _store_tokenizer(store: BlockStore, tokenizer: Any) -> Any:
    """The tokenizer `store` was made with: `tokenizer`, else the folder its manifest
    records; ValueError when its vocabulary is another."""
    tokenizer = tokenizer or store.manifest.get("tokenizer_path")
    if not tokenizer:
        raise ValueError(f"{store.path / 'manifest.json'} records no tokenizer folder: pass "
                         "--tokenizer (the HF folder the store was prepared with)")
    tok = load_tokenizer(tokenizer)
    store.check_tokenizer(tokenizer, tok.vocab_hash)
    return tok


def _write_version(base: BlockStore, root: Path, version: int, removed: set[int],
                   appended: list[tuple[Document, list[_Block], int]],
                   update: dict[str, Any]) -> str:
    """Writes version `version`: every row of `base` (removed ones as removed blocks), then
    the appended documents' blocks; returns its fingerprint."""
    with BlockStoreWriter(version_folder(root, version), token_dtype=base.token_dtype,
                          settings=base.settings) as writer:
        for i in range(len(base)):
            if i in removed:
                writer.add_removed()
            else:
                writer.copy_block(base, i)
        for doc, doc_blocks, ordinal in appended:
            for block in doc_blocks:
                writer.add(block.tokens, doc_id=doc.doc_id, title=doc.title, text=block.text,
                           spans=block.spans, doc_index=ordinal)
        keep = {k: base.manifest[k] for k in ("source", "tokenizer_path") if k in base.manifest}
        manifest = writer.finish({**keep, "store_version": version,
                                  "parent_version": base.version,
                                  "parent_fingerprint": base.fingerprint, "update": update})
    return manifest["fingerprint"]
