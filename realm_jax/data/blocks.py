"""Tokenizer loading and block splitting (REALM wordpiece blocks, DPR 100-word passages).

A document is tokenized once (no special tokens); blocks are contiguous character ranges of
the document text whose tokens are the matching contiguous range of the document's tokens, so
``tokens == tokenizer(block_text, add_special_tokens=False)`` for BERT-style tokenizers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from realm_jax.data.wikitext import Span

# A folder without one of these would load as a tokenizer of special tokens only.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")

Mode = Literal["realm", "dpr"]
MODES = ("realm", "dpr")

# A sentence ends at . ! ? (plus closing quotes/brackets) before whitespace and a capital,
# digit or opening quote; every line break also ends one.
_SENTENCE_END_RE = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])|\n+")
_WORD_RE = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """A fast tokenizer with truncation and padding off, and what identifies it."""

    backend: Any  # tokenizers.Tokenizer
    name: str
    vocab_size: int
    vocab_hash: str

    @property
    def token_dtype(self) -> np.dtype:
        """uint16 when every id fits, else int32."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[Any]:
        """Encodings (ids, offsets, word ids) without special tokens."""
        return self.backend.encode_batch(list(texts), add_special_tokens=False)


def load_tokenizer(tokenizer: str | os.PathLike | Any) -> TokenizerInfo:
    """Loads a tokenizer from a local Hugging Face folder (or wraps a loaded fast tokenizer)."""
    if isinstance(tokenizer, TokenizerInfo):
        return tokenizer
    import tokenizers
    from transformers import AutoTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {path} (expected a local Hugging "
                                    "Face model folder with tokenizer.json or vocab.txt)")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer folder {path} has no tokenizer file (one of "
                                    f"{', '.join(_TOKENIZER_FILES)}); point at the model folder "
                                    "the corpus is tokenized with")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; block splitting "
                         "needs character offsets (load a folder with tokenizer.json)")
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer")).name
    return tokenizer_info(tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), name)


def tokenizer_info(backend: Any, name: str) -> TokenizerInfo:
    """Wraps a `tokenizers.Tokenizer` (truncation and padding turned off). The vocab hash covers
    what decides the ids: normalizer, pre-tokenizer, model and added tokens."""
    backend.no_truncation()
    backend.no_padding()
    spec = json.loads(backend.to_str())
    identity = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
    vocab_hash = hashlib.sha256(
        json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return TokenizerInfo(backend, name, backend.get_vocab_size(with_added_tokens=True),
                         vocab_hash)


@dataclasses.dataclass(frozen=True)
class Piece:
    """A block cut from a document: ``text[char_start:char_end]``, ``ids[tok_start:tok_end]``."""

    char_start: int
    char_end: int
    tok_start: int
    tok_end: int


def sentence_starts(text: str, spans: Sequence[Span] = ()) -> list[int]:
    """Character offsets where sentences start (always 0 first), never inside a span
    (so an anchor like "J. M. W. Turner" is not cut)."""
    starts = np.array([m.end() for m in _SENTENCE_END_RE.finditer(text) if m.end() < len(text)],
                      dtype=np.int64)
    if len(spans) and len(starts):
        bounds = np.array([(s, e) for s, e, _ in spans], dtype=np.int64)
        inside = ((bounds[None, :, 0] < starts[:, None])
                  & (starts[:, None] < bounds[None, :, 1])).any(axis=1)
        starts = starts[~inside]
    return [0] + starts.tolist()


def _token_starts(offsets: np.ndarray) -> np.ndarray:
    return offsets[:, 0] if len(offsets) else np.zeros(0, dtype=np.int64)


def realm_pieces(text: str, offsets: np.ndarray, word_ids: np.ndarray, max_tokens: int,
                 spans: Sequence[Span] = ()) -> list[Piece]:
    """Greedy packing of whole sentences into blocks of at most ``max_tokens`` tokens.

    A sentence longer than ``max_tokens`` is cut between words (mid-word only for a single
    word longer than the limit); its last part opens the next block.
    """
    n = len(offsets)
    if n == 0:
        return []
    starts = _token_starts(offsets)
    bounds = np.unique(np.searchsorted(starts, sentence_starts(text, spans), side="left"))
    bounds = np.append(bounds[bounds < n], n)
    bounds[0] = 0
    word_cut = np.flatnonzero(np.diff(word_ids) != 0) + 1  # token indices starting a new word

    ranges: list[tuple[int, int]] = []
    cur_start = cur_end = 0
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if e - cur_start <= max_tokens:
            cur_end = e
            continue
        if cur_end > cur_start:
            ranges.append((cur_start, cur_end))
        cur_start = s
        while e - cur_start > max_tokens:
            limit = cur_start + max_tokens
            k = int(np.searchsorted(word_cut, limit, side="right")) - 1
            cut = int(word_cut[k]) if k >= 0 and word_cut[k] > cur_start else limit
            ranges.append((cur_start, cut))
            cur_start = cut
        cur_end = e
    if cur_end > cur_start:
        ranges.append((cur_start, cur_end))
    return [Piece(int(offsets[a, 0]), int(offsets[b - 1, 1]), a, b) for a, b in ranges]


def passage_pieces(text: str, offsets: np.ndarray, words_per_passage: int) -> list[Piece]:
    """Consecutive passages of ``words_per_passage`` whitespace-separated words (the last may be
    shorter), as in DPR's 100-word Wikipedia passages."""
    words = [m.span() for m in _WORD_RE.finditer(text)]
    starts = _token_starts(offsets)
    pieces = []
    for i in range(0, len(words), words_per_passage):
        c0, c1 = words[i][0], words[min(i + words_per_passage, len(words)) - 1][1]
        t0, t1 = np.searchsorted(starts, [c0, c1], side="left").tolist()
        pieces.append(Piece(c0, c1, t0, t1))
    return pieces


def spans_in(spans: Sequence[Span], piece: Piece) -> tuple[list[Span], int]:
    """The spans inside ``piece``, relative to its start, and how many it cuts through."""
    inside, cut = [], 0
    for start, end, target in spans:
        if start >= piece.char_start and end <= piece.char_end:
            inside.append(Span(start - piece.char_start, end - piece.char_start, target))
        elif start < piece.char_end and end > piece.char_start:
            cut += 1
    return inside, cut


def split_document(text: str, encoding: Any, *, mode: Mode, max_tokens: int,
                   passage_words: int, spans: Sequence[Span] = ()) -> list[Piece]:
    """The blocks of one tokenized document (empty when it has no tokens); REALM blocks do
    not break sentences inside ``spans``."""
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    if mode == "realm":
        word_ids = np.asarray([-1 if w is None else w for w in encoding.word_ids], dtype=np.int64)
        return realm_pieces(text, offsets, word_ids, max_tokens, spans)
    if mode == "dpr":
        return passage_pieces(text, offsets, passage_words)
    raise ValueError(f"unknown block mode {mode!r}; expected one of {', '.join(MODES)}")
