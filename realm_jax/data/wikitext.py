"""MediaWiki wikitext -> plain text, keeping internal-link anchors as character spans.

The conversion is a small, self-contained approximation of what MediaWiki renders:
templates, tables, references, comments, math, galleries, files, images, categories and
interlanguage links are dropped; bold/italic quotes, heading and list markup and HTML tags
are stripped (their text kept); ``[[target|anchor]]`` becomes ``anchor`` and ``[[target]]``
becomes ``target`` (plus any link trail, as in ``[[bus]]es``). Every kept internal link to an
article is reported as a span ``(start, end, target)`` of the returned text, for salient-span
masking.
"""

from __future__ import annotations

import html
import re
from typing import NamedTuple

import numpy as np


class Span(NamedTuple):
    """A link anchor: ``text[start:end]`` is the anchor, ``target`` the linked page title."""

    start: int
    end: int
    target: str


# Tags whose whole content is not article prose.
_DROP_ELEMENTS = ("ref", "references", "math", "chem", "ce", "gallery", "timeline", "imagemap",
                  "score", "syntaxhighlight", "source", "graph", "mapframe", "maplink", "hiero",
                  "templatedata", "noinclude", "inputbox", "categorytree")
_DROP_ELEMENTS_RE = "|".join(_DROP_ELEMENTS)
_SELF_CLOSING_RE = re.compile(rf"<(?:{_DROP_ELEMENTS_RE})\b[^>]*?/>", re.I)
_ELEMENT_RE = re.compile(rf"<({_DROP_ELEMENTS_RE})\b[^>]*?>.*?</\1\s*>", re.I | re.S)
_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_BRACE_RE = re.compile(r"\{\{|\}\}")
_TABLE_RE = re.compile(r"^[ \t:]*(\{\||\|\})", re.M)
_LINK_BRACKET_RE = re.compile(r"\[\[|\]\]")
_DROP_LINK_RE = re.compile(r"\s*(?:file|image|media|category)\s*:", re.I)
_LANG_LINK_RE = re.compile(r"\s*[a-z]{2,3}(?:-[a-z]+)*\s*:[^|]*$")
_HEADING_RE = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.M)
_DROP_SECTIONS = frozenset((
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "notes and references", "citations", "footnotes", "references and notes"))
_MAGIC_RE = re.compile(r"__[A-Z]+__")
_QUOTES_RE = re.compile(r"'{2,}")
_LIST_RE = re.compile(r"^(?:[*#:;]+[ \t]*|-{4,}[ \t]*)", re.M)
_BR_RE = re.compile(r"<br\s*/?>", re.I)
_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_EMPTY_PARENS_RE = re.compile(r"\([\s,;:]*\)")
_LINK_RE = re.compile(
    r"\[\[([^\[\]]*)\]\]([a-z]*)"                                   # internal link + trail
    r"|\[(?:https?:|ftp:)?//[^\s\]]*(?:[ \t]+([^\]\n]*))?\]")       # external link [url label]
# Namespaces and interwiki prefixes: such links show their text but are not entity spans.
_NON_ARTICLE_PREFIXES = frozenset((
    "media", "special", "talk", "user", "user talk", "wikipedia", "wikipedia talk", "wp",
    "project", "file", "image", "mediawiki", "template", "help", "category", "portal", "book",
    "draft", "education program", "timedtext", "module", "gadget", "topic", "wikt",
    "wiktionary", "w", "s", "wikisource", "q", "wikiquote", "b", "wikibooks", "n", "wikinews",
    "v", "wikiversity", "voy", "wikivoyage", "commons", "c", "meta", "m", "mw", "species",
    "d", "wikidata", "foundation", "wmf", "incubator", "phab", "bugzilla", "doi", "hdl",
    "iarchive", "arxiv", "rfc", "google", "imdbname", "imdbtitle"))
_LANG_CODE_RE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*")


def _remove_ranges(text: str, ranges: list[tuple[int, int]]) -> str:
    """Deletes the (possibly overlapping) ``[start, end)`` ranges from ``text``."""
    if not ranges:
        return text
    out, pos = [], 0
    for start, end in sorted(ranges):
        if end <= pos:
            continue
        out.append(text[pos:max(start, pos)])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _balanced_ranges(text: str, pattern: re.Pattern, opener: str) -> list[tuple[int, int, int]]:
    """``(start, end, depth)`` of every balanced opener/closer pair; unmatched ones are ignored."""
    stack: list[int] = []
    found = []
    for m in pattern.finditer(text):
        if m.group(0).lstrip(" \t:").startswith(opener):
            stack.append(m.start())
        elif stack:
            start = stack.pop()
            found.append((start, m.end(), len(stack)))
    return found


def _strip_templates(text: str) -> str:
    """Removes ``{{...}}`` templates, nested ones included."""
    return _remove_ranges(text, [(s, e) for s, e, depth in
                                 _balanced_ranges(text, _BRACE_RE, "{{") if depth == 0])


def _strip_tables(text: str) -> str:
    """Removes ``{| ... |}`` tables (whole lines), nested ones included."""
    ranges = []
    for start, end, depth in _balanced_ranges(text, _TABLE_RE, "{|"):
        if depth == 0:
            line_end = text.find("\n", end)
            ranges.append((start, len(text) if line_end < 0 else line_end))
    return _remove_ranges(text, ranges)


def _strip_file_links(text: str) -> str:
    """Removes file, image, media and category links (with captions) and interlanguage links."""
    ranges = []
    for start, end, _ in _balanced_ranges(text, _LINK_BRACKET_RE, "[["):
        inner = text[start + 2:end - 2]
        if _DROP_LINK_RE.match(inner) or _LANG_LINK_RE.match(inner):
            ranges.append((start, end))
    return _remove_ranges(text, ranges)


def _strip_sections(text: str) -> str:
    """Drops reference-like sections (References, External links, See also, ...)."""
    headings = list(_HEADING_RE.finditer(text))
    ranges = []
    for i, m in enumerate(headings):
        if m.group(2).strip().lower() not in _DROP_SECTIONS:
            continue
        level, end = len(m.group(1)), len(text)
        for later in headings[i + 1:]:
            if len(later.group(1)) <= level:
                end = later.start()
                break
        ranges.append((m.start(), end))
    return _remove_ranges(text, ranges)


def _link_target(raw: str) -> str | None:
    """The normalized article title a link points at, or None for non-article links."""
    target = raw.split("#", 1)[0].replace("_", " ").strip().lstrip(":").strip()
    target = " ".join(target.split())
    if not target:
        return None
    if ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _NON_ARTICLE_PREFIXES or _LANG_CODE_RE.fullmatch(prefix):
            return None
    return target[0].upper() + target[1:]


def _render_links(text: str) -> tuple[str, list[Span]]:
    """Replaces internal and external links by their visible text and records anchor spans."""
    out: list[str] = []
    spans: list[Span] = []
    length = pos = 0
    for m in _LINK_RE.finditer(text):
        piece = text[pos:m.start()]
        out.append(piece)
        length += len(piece)
        pos = m.end()
        if m.group(1) is None:  # external link: keep the label only
            label = m.group(3) or ""
            out.append(label)
            length += len(label)
            continue
        raw_target, sep, anchor = m.group(1).partition("|")
        if not sep:
            anchor = raw_target.strip().lstrip(":")
        anchor = anchor.strip() + m.group(2)
        target = _link_target(raw_target)
        if anchor and target is not None:
            spans.append(Span(length, length + len(anchor), target))
        out.append(anchor)
        length += len(anchor)
    out.append(text[pos:])
    return "".join(out), spans


def _apply_deletions(text: str, spans: list[Span], deletions: list[tuple[int, int]]
                     ) -> tuple[str, list[Span]]:
    """Deletes sorted, non-overlapping character ranges and moves the spans with the text."""
    if not deletions:
        return text, spans
    starts = np.array([s for s, _ in deletions], dtype=np.int64)
    ends = np.array([e for _, e in deletions], dtype=np.int64)
    removed = np.concatenate([[0], np.cumsum(ends - starts)])
    pos = np.array([p for s, e, _ in spans for p in (s, e)], dtype=np.int64)
    k = np.searchsorted(starts, pos, side="left")  # deletions starting before each position
    inside = np.maximum(0, ends[np.maximum(k - 1, 0)] - pos) * (k > 0)
    moved = (pos - removed[k] + inside).tolist()
    new_spans = [Span(moved[2 * j], moved[2 * j + 1], t) for j, (_, _, t) in enumerate(spans)]
    return _remove_ranges(text, deletions), [s for s in new_spans if s.end > s.start]


_BLANKS_RE = re.compile(r"^ +| +$| +(?=[,.;:!?)\]])|(?<=[(\[]) +|(?<= ) +", re.M)
_NEWLINES_RE = re.compile(r"(?<=\n\n)\n+")


def _compact_whitespace(text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    """Collapses blank runs and blank lines left by the removals, keeping spans aligned."""
    text = text.translate({0x09: 0x20, 0xA0: 0x20, 0x0D: 0x20})
    text, spans = _apply_deletions(text, spans, [m.span() for m in _BLANKS_RE.finditer(text)])
    dels = [m.span() for m in _NEWLINES_RE.finditer(text)]
    lead, end = len(text) - len(text.lstrip()), len(text.rstrip())
    if lead:
        dels = [(0, lead)] + [d for d in dels if d[0] >= lead]
    if end < len(text):
        dels = [d for d in dels if d[1] <= end] + [(end, len(text))]
    return _apply_deletions(text, spans, dels)


def _trim_spans(text: str, spans: list[Span]) -> list[Span]:
    """Shrinks spans to exclude surrounding whitespace; drops empty ones."""
    out = []
    for start, end, target in spans:
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        if end - trail > start + lead:
            out.append(Span(start + lead, end - trail, target))
    return out


def wikitext_to_text(wikitext: str) -> tuple[str, list[Span]]:
    """Converts MediaWiki markup to plain text.

    Returns the text and the internal-link anchors in it as ``Span(start, end, target)``,
    where ``text[start:end]`` is the anchor text and ``target`` the linked article title
    (first letter upper-cased, underscores as spaces, no ``#section``).
    """
    text = wikitext
    for pattern in (_COMMENT_RE, _SELF_CLOSING_RE, _ELEMENT_RE):
        text = pattern.sub("", text)
    for strip in (_strip_templates, _strip_tables, _strip_file_links, _strip_sections):
        text = strip(text)
    for pattern, replacement in ((_HEADING_RE, r"\2"), (_MAGIC_RE, ""), (_QUOTES_RE, ""),
                                 (_LIST_RE, ""), (_BR_RE, " "), (_TAG_RE, "")):
        text = pattern.sub(replacement, text)
    text = html.unescape(text)
    text = _EMPTY_PARENS_RE.sub("", text)
    text, spans = _render_links(text)
    text, spans = _compact_whitespace(text, spans)
    return text, _trim_spans(text, spans)
