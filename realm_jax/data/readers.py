"""Corpus readers: JSONL, TFDS (array_record data sources) and Wikipedia XML dumps.

Every reader yields :class:`Document` objects in corpus order and counts what it skips in a
:class:`SkipCounter` (by reason, with the first few occurrences logged with their location).
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import itertools
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from realm_jax.data.spans import parse_span_annotations
from realm_jax.data.wikitext import Span, wikitext_to_text

_log = logging.getLogger(__name__)

FORMATS = ("jsonl", "tfds", "wiki_xml")


@dataclasses.dataclass(frozen=True)
class Document:
    """One source document: its id, title, plain text and (optional) entity spans in the text."""

    doc_id: str
    title: str
    text: str
    spans: Sequence[Span] = ()


class SkipCounter:
    """Counts skipped items by reason; logs the first ``log_first`` of each reason."""

    def __init__(self, log_first: int = 5):
        self.counts: collections.Counter[str] = collections.Counter()
        self._log_first = log_first

    def skip(self, reason: str, where: str) -> None:
        """Records one skipped item; ``where`` names it (file and line, or record index)."""
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self._log_first:
            _log.warning("skipped %s: %s%s", where, reason,
                         " (further ones counted, not logged)" if n == self._log_first else "")

    def as_dict(self) -> dict[str, int]:
        """The counts, sorted by reason."""
        return dict(sorted(self.counts.items()))


def detect_format(source: str | os.PathLike) -> str:
    """The reader for ``source``: ``tfds:NAME``, ``*.jsonl[.gz]``, ``*.xml[.bz2]`` / ``*.bz2``."""
    s = os.fspath(source)
    if s.startswith("tfds:"):
        return "tfds"
    low = s.lower()
    if low.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        return "jsonl"
    if low.endswith((".xml", ".xml.bz2", ".bz2")):
        return "wiki_xml"
    raise ValueError(f"cannot tell the corpus format of {s!r}: name it .jsonl, .xml.bz2, or "
                     f"tfds:NAME, or pass the format ({', '.join(FORMATS)})")


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; FileNotFoundError ("WHAT file not found: PATH") if not a file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    return p


def file_format(path: Path, format: str, formats: dict[str, tuple[str, ...]], what: str
                ) -> str:
    """``format`` if one of ``formats`` (name -> file name endings), or for ``"auto"`` the one
    whose ending ``path`` has (a ``.gz`` after it aside); ValueError naming the ``what`` file
    format otherwise."""
    if format != "auto":
        if format not in formats:
            raise ValueError(f"unknown {what} format {format!r}; expected one of "
                             f"{', '.join(formats)} or 'auto'")
        return format
    name = path.name.lower().removesuffix(".gz")
    for fmt, endings in formats.items():
        if name.endswith(endings):
            return fmt
    raise ValueError(f"cannot tell the {what} file format of {path}: name it "
                     f"{' or '.join(e for endings in formats.values() for e in endings)}, or "
                     f"pass format= one of {', '.join(formats)}")


def open_binary(path: Path) -> IO[bytes]:
    """``path`` opened for reading bytes, decompressed when it ends in .gz or .bz2."""
    return {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)(path, "rb")


def _field(record: dict, key: str, kind: type | tuple[type, ...], skips: SkipCounter,
           where: str) -> Any:
    """``record[key]`` if present and of the right type, else None (and counted)."""
    value = record.get(key)
    if value is None:
        skips.skip(f"missing_field:{key}", where)
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        skips.skip(f"bad_field_type:{key}", where)
        return None
    return value


def read_jsonl(path: str | os.PathLike, skips: SkipCounter, *, id_field: str | None = "id",
               title_field: str = "title", text_field: str = "text") -> Iterator[Document]:
    """Reads one JSON object per line (``.jsonl`` or ``.jsonl.gz``).

    Lines are decoded one by one, so a bad UTF-8 line is skipped and counted, not fatal.
    Reasons counted: ``blank_line``, ``bad_utf8``, ``invalid_json``, ``not_an_object``,
    ``missing_field:F``, ``bad_field_type:F``, ``empty_text``, ``bad_spans``. ``id_field=None``
    numbers the documents by line instead. A missing file raises at once.

    An optional ``spans`` field holds pre-annotated salient spans, ``[start, end(, label)]``
    or ``{"start", "end", "label"}`` items in byte offsets of the UTF-8 text (as in REALM's
    preprocessed data); a document whose spans do not fit its text is skipped and counted.
    """
    return _iter_jsonl(require_file(path, "corpus"), skips, id_field, title_field, text_field)


def _iter_jsonl(p: Path, skips: SkipCounter, id_field: str | None, title_field: str,
                text_field: str) -> Iterator[Document]:
    with open_binary(p) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                skips.skip("blank_line", where)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.skip("bad_utf8", f"{where} (byte {e.start})")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                skips.skip("invalid_json", f"{where} ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                skips.skip("not_an_object", where)
                continue
            values: list[Any] = []   # up to the first missing or bad field (the one counted)
            for key, kind in ((id_field, (str, int)), (title_field, str), (text_field, str)):
                values.append(str(lineno) if key is None
                              else _field(record, key, kind, skips, where))
                if values[-1] is None:
                    break
            if values[-1] is None:
                continue
            doc_id, title, text = values
            if not text.strip():
                skips.skip("empty_text", where)
                continue
            try:
                spans = parse_span_annotations(record.get("spans") or [], text, offsets="byte")
            except ValueError as e:
                skips.skip("bad_spans", f"{where} ({e})")
                continue
            yield Document(str(doc_id), title, text, spans)


def decode_text(value: Any) -> str:
    """A TFDS / grain record value as text: bytes decoded as UTF-8, numpy scalars unwrapped."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy scalar / 0-d array
        return decode_text(value.item())
    return str(value)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` consecutive items of ``items``, the last one possibly shorter."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def source_records(source: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """``(index, record)`` of a random-access source (``len`` and ``[i]``, or
    ``__getitems__``) in index order, fetched ``batch_size`` at a time."""
    get_many = getattr(source, "__getitems__", None)
    for indices in batched(range(len(source)), batch_size):
        yield from zip(indices, get_many(indices) if get_many else [source[i] for i in indices])


def read_tfds(name: str, skips: SkipCounter, *, split: str = "train",
              data_dir: str | os.PathLike | None = None, id_field: str | None = "id",
              title_field: str = "title", text_field: str = "text",
              batch_size: int = 256) -> Iterable[Document]:
    """Reads a prepared TFDS dataset through ``tfds.data_source`` (array_record; no TensorFlow).

    Never downloads: the dataset must already be prepared under ``data_dir``. When the dataset
    has no ``id_field`` feature (TFDS ``wikipedia`` has none), the record index is the id.
    """
    import tensorflow_datasets as tfds  # heavy; only when this reader is used

    name = name.removeprefix("tfds:")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # DatasetNotFoundError, unknown split, missing files
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not available in data_dir "
            f"{data_dir or '(TFDS default)'}: {str(e).splitlines()[0]}. Prepare it there first "
            f"(for example `tfds build {name.split('/')[0]} --data_dir DIR "
            f"--file_format array_record` on a machine with network access).") from e
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    if features is not None:
        keys = set(features.keys())
        for key in (title_field, text_field):
            if key not in keys:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} "
                                 f"(features: {sorted(keys)})")
        if id_field is not None and id_field not in keys:
            _log.info("TFDS dataset %r has no %r feature; using the record index as id",
                      name, id_field)
            id_field = None
    return read_data_source(source, skips, label=f"tfds:{name}[{split}]", id_field=id_field,
                            title_field=title_field, text_field=text_field,
                            batch_size=batch_size)


def read_data_source(source: Any, skips: SkipCounter, *, label: str = "data source",
                     id_field: str | None = "id", title_field: str = "title",
                     text_field: str = "text", batch_size: int = 256) -> Iterable[Document]:
    """Reads any random-access source of dict records (``len`` and ``[i]``, e.g. a TFDS or
    grain data source) in index order; bytes values are decoded as UTF-8. The result has a
    ``len`` (the number of records).

    ``id_field=None`` uses the record index as the id.
    """
    def documents() -> Iterator[Document]:
        for index, record in source_records(source, batch_size):
            where = f"{label} record {index}"
            fields = {}
            for key in (id_field, title_field, text_field):
                if key is None:
                    continue
                if key not in record:
                    skips.skip(f"missing_field:{key}", where)
                    break
                try:
                    fields[key] = decode_text(record[key])
                except UnicodeDecodeError:
                    skips.skip("bad_utf8", f"{where} field {key}")
                    break
            else:
                if not fields[text_field].strip():
                    skips.skip("empty_text", where)
                    continue
                doc_id = str(index) if id_field is None else fields[id_field]
                yield Document(doc_id, fields[title_field], fields[text_field])

    return _Sized(documents(), len(source))


class _Sized:
    """An iterator that knows how many records it will go through (for progress ETAs)."""

    def __init__(self, iterator: Iterator[Document], length: int):
        self._iterator, self._length = iterator, length

    def __iter__(self) -> Iterator[Document]:
        return self._iterator

    def __len__(self) -> int:
        return self._length


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str | None:
    for child in elem:
        if _local(child.tag) == name:
            return child.text
    return None


def read_wiki_xml(path: str | os.PathLike, skips: SkipCounter) -> Iterator[Document]:
    """Stream-parses a MediaWiki XML export (``.xml`` or ``.xml.bz2``), one page at a time.

    Articles (namespace 0) become plain text with link anchors as spans; counted and skipped:
    ``redirect``, ``non_article_namespace``, ``missing_field:text``, ``empty_text`` (nothing left
    after removing markup). A missing file raises at once.
    """
    return _iter_wiki_xml(require_file(path, "corpus"), skips)


def _iter_wiki_xml(p: Path, skips: SkipCounter) -> Iterator[Document]:
    with open_binary(p) as f:
        root = None
        try:
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = elem
                if event != "end" or _local(elem.tag) != "page":
                    continue
                doc = _page_document(elem, skips, p)
                root.clear()
                if doc is not None:
                    yield doc
        except (ET.ParseError, EOFError, OSError) as e:
            raise ValueError(f"{p}: not a readable MediaWiki XML dump (corrupt or truncated?): "
                             f"{e}") from e


def _page_document(page: ET.Element, skips: SkipCounter, path: Path) -> Document | None:
    title = _child_text(page, "title") or ""
    page_id = _child_text(page, "id") or ""
    where = f"{path} page {page_id} {title!r}"
    ns = (_child_text(page, "ns") or "0").strip()
    if ns != "0":
        skips.skip("non_article_namespace", where)
        return None
    revision = next((c for c in page if _local(c.tag) == "revision"), None)
    wikitext = None if revision is None else _child_text(revision, "text")
    if any(_local(c.tag) == "redirect" for c in page) or (
            wikitext or "").lstrip()[:9].upper() == "#REDIRECT":
        skips.skip("redirect", where)
        return None
    if wikitext is None:
        skips.skip("missing_field:text", where)
        return None
    text, spans = wikitext_to_text(wikitext)
    if not text.strip():
        skips.skip("empty_text", where)
        return None
    return Document(page_id, title, text, spans)


def read_documents(source: str | os.PathLike, skips: SkipCounter, *, fmt: str | None = None,
                   tfds_split: str = "train", tfds_data_dir: str | os.PathLike | None = None,
                   id_field: str | None = "id", title_field: str = "title",
                   text_field: str = "text") -> Iterable[Document]:
    """Dispatches to the reader for ``fmt`` (guessed from ``source`` when None)."""
    fmt = fmt or detect_format(source)
    if fmt == "jsonl":
        return read_jsonl(source, skips, id_field=id_field, title_field=title_field,
                          text_field=text_field)
    if fmt == "tfds":
        return read_tfds(os.fspath(source), skips, split=tfds_split, data_dir=tfds_data_dir,
                         id_field=id_field, title_field=title_field, text_field=text_field)
    if fmt == "wiki_xml":
        return read_wiki_xml(source, skips)
    raise ValueError(f"unknown corpus format {fmt!r}; expected one of {', '.join(FORMATS)}")
