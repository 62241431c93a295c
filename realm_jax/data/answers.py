"""Answer matching on the host, for ORQA / REALM open-QA training: which passages contain an
answer (the retrieval targets) and which wordpiece spans of a passage match one (the reader
targets), with the normalization the evaluation uses (`realm_jax.evaluate`).

A span (i, j) of a block's stored wordpieces matches when ``normalize_answer`` of its text
(the block text between the first wordpiece's start and the last one's end, so original
casing and punctuation) equals ``normalize_answer`` of an answer, and both its end
wordpieces have content (normalize to something): punctuation or an article at an edge
adds nothing to the normalized text, so "U.S" is a target for "US" but ". The U.S." is
not, and predictions come out clean.

Only spans that could match are normalized: the first wordpiece's normalized text must
begin the compact answer (blanks removed), and a span stops growing once its wordpieces'
content is longer than the answer's. (A wordpiece's own normalized text is at most what it
adds to a span's as long as the vocabulary holds the articles whole, so these cuts drop no
match; a wordpiece that normalizes to nothing alone but is glued to the next one, like
"the" in "the|ater", is not used to cut.) A regex answer (CuratedTrec) matches a span when
the evaluation's ``regex_match`` accepts its text (every span with content ends is tried).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import Sequence

import numpy as np

from realm_jax import evaluate as ev
from realm_jax.data.blocks import TokenizerInfo, load_tokenizer
from realm_jax.data.pipeline import LruCache
from realm_jax.data.store import BlockStore


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


@dataclasses.dataclass(frozen=True)
class PassageTokens:
    """A block's text with the character offsets [n, 2] of its stored wordpieces and each
    wordpiece's normalized text without blanks (None: empty alone but glued to the next
    wordpiece, so of unknown content inside a span)."""

    text: str
    offsets: np.ndarray
    normalized: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.offsets)

    def span_text(self, i: int, j: int) -> str:
        """The text of wordpieces i..j (inclusive) as written in the passage."""
        return self.text[int(self.offsets[i, 0]):int(self.offsets[j, 1])]

    @classmethod
    def from_text(cls, text: str, tokenizer: TokenizerInfo) -> "PassageTokens":
        encoding = tokenizer.encode_batch([text])[0]
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        normalize = ev.normalize_answer
        pieces = [normalize(text[a:b]).replace(" ", "") for a, b in offsets.tolist()]
        # glued: the next wordpiece continues the word (no gap, starts with a letter/digit)
        glued = [b == c and text[c:c + 1].isalnum()
                 for (_, b), (c, _) in zip(offsets.tolist(), offsets[1:].tolist())] + [False]
        return cls(text, offsets, tuple(
            None if not p and g and any(c.isalnum() for c in text[a:b]) else p
            for p, g, (a, b) in zip(pieces, glued, offsets.tolist())))


def matching_spans(passage: PassageTokens, answers: Sequence[str], max_width: int, *,
                 regex: bool = False) -> list[tuple[int, int]]:
    """The wordpiece spans (i, j), inclusive, at most ``max_width`` wide, whose text matches
    an answer; sorted."""
    pieces = passage.normalized
    n = len(pieces)
    edges = [i for i in range(n) if pieces[i] != ""]
    found: set[tuple[int, int]] = set()
    if regex:
        for i in edges:
            for j in range(i, min(n, i + max_width)):
                if pieces[j] != "" and ev.regex_match(passage.span_text(i, j), answers):
                    found.add((i, j))
        return sorted(found)
    for target in {ev.normalize_answer(a) for a in answers} - {""}:
        compact = target.replace(" ", "")
        for i in edges:
            if pieces[i] is not None and not compact.startswith(pieces[i]):
                continue
            content = 0
            for j in range(i, min(n, i + max_width)):
                content += len(pieces[j] or "")
                if content > len(compact):
                    break
                if pieces[j] != "" and ev.normalize_answer(passage.span_text(i, j)) == target:
                    found.add((i, j))
    return sorted(found)


class AnswerMatcher:
    """Answer matching against a block store's blocks, with an LRU cache of tokenized
    blocks (thread-safe). ``tokenizer``: the store's (its wordpieces are the reader's)."""

    def __init__(self, store: BlockStore, tokenizer, cache_size: int = 4096):
        self.store = store
        self.tokenizer = load_tokenizer(tokenizer)
        self._cache = LruCache(cache_size)

    def passage(self, block_id: int) -> PassageTokens:
        return self._cache.get(int(block_id), self._tokenize)

    def _tokenize(self, block_id: int) -> PassageTokens:
        passage = PassageTokens.from_text(self.store.text(block_id), self.tokenizer)
        if len(passage) != int(self.store.lengths[block_id]):
            raise ValueError(
                f"block {block_id} of {self.store.path}: the tokenizer gives {len(passage)} "
                f"wordpieces, the store holds {int(self.store.lengths[block_id])}; set "
                "data.tokenizer to the folder the store was prepared with")
        return passage

    def contains(self, block_ids: Sequence[int], answers: Sequence[str], *,
                 regex: bool = False) -> np.ndarray:
        """bool [len(block_ids)]: the block's text contains an answer (``has_answer``);
        negative ids (empty slots) are False.

        For a beam of thousands of blocks, ``has_answer`` (which tokenizes the text) runs
        only on the blocks whose case-folded NFKC text holds the first token of an answer
        somewhere (a substring test, far cheaper): a block holding that answer's
        tokens meets it (has_answer's tokens are NFKC-lowercased pieces of the text;
        folding both sides keeps e.g. a final sigma from mattering)."""
        firsts = None if regex else {_fold(tokens[0][0])
                                     for tokens in map(ev.answer_tokens, answers) if tokens}
        out = np.zeros(len(block_ids), bool)
        for i, b in enumerate(np.asarray(block_ids).tolist()):
            if b < 0:
                continue
            text = self.store.text(b)
            if firsts is not None:
                folded = _fold(text)
                if not any(f in folded for f in firsts):
                    continue
            out[i] = ev.has_answer(text, answers, regex=regex)
        return out

    def spans(self, block_id: int, answers: Sequence[str], max_width: int, *,
              regex: bool = False) -> list[tuple[int, int]]:
        """:func:`matching_spans` of a block (none for an empty slot)."""
        if block_id < 0:
            return []
        return matching_spans(self.passage(block_id), answers, max_width, regex=regex)

    def span_text(self, block_id: int, i: int, j: int) -> str:
        return self.passage(block_id).span_text(i, j)
