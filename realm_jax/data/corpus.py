"""``prepare_corpus``: read a corpus, split it into blocks, tokenize, write a block store."""

from __future__ import annotations

import array
import dataclasses
import hashlib
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
from realm_jax.data.readers import Document, SkipCounter, detect_format, read_documents
from realm_jax.data.store import BlockStore, BlockStoreWriter, check_replaceable

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
            for doc, enc in zip(batch, tok.encode_batch([d.text for d in batch])):
                pieces = [p for p in split_document(doc.text, enc, mode=mode,
                                                    max_tokens=max_tokens,
                                                    passage_words=passage_words,
                                                    spans=doc.spans)
                          if p.tok_end > p.tok_start]
                if not pieces:
                    skips.skip("no_tokens", f"{source_info['path']} document {doc.doc_id!r}")
                    continue
                ids = np.asarray(enc.ids, dtype=np.int64)
                for piece in pieces:
                    spans, cut = spans_in(doc.spans, piece)
                    counts["spans_cut"] += cut
                    writer.add(ids[piece.tok_start:piece.tok_end], doc_id=doc.doc_id,
                               title=doc.title, text=doc.text[piece.char_start:piece.char_end],
                               spans=spans, doc_index=counts["documents"])
                counts["documents"] += 1
                id_hashes.append(_id_hash(doc.doc_id))
            bar.update(len(batch))
            bar.set_postfix(blocks=len(writer), skipped=sum(skips.counts.values()),
                            refresh=False)

        batch: list[Document] = []
        read = 0
        for doc in _prefetch(documents, 4 * batch_documents):
            batch.append(doc)
            read += 1
            if len(batch) >= batch_documents:
                flush(batch)
                batch = []
            if max_documents is not None and read >= max_documents:
                break
        if batch:
            flush(batch)
        if len(writer) == 0:
            raise ValueError(f"no usable documents in {source_info['path']}: "
                             f"skipped {skips.as_dict() or 'nothing (the corpus is empty)'}")
        duplicates, first_repeated = _repeated_ids(id_hashes)
        manifest = writer.finish({
            "source": source_info, "skipped": skips.as_dict(),
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
