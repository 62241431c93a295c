"""RAG (Lewis et al., 2020): a DPR question encoder and a BART generator.

The retriever's document side is frozen: the documents' embeddings come from the index
(the context encoder ran when it was built), and only decide which documents are looked
at and how they score. The model recomputes the document scores with the live question
encoder, so the loss trains it, and runs BART over every (question, document) context:

    q        = Embed_q(question)                                   [B, P]
    scores   = q . doc_embeddings                                  [B, K]
    logits   = BART(context_k = "title / text // question", decoder inputs)   [B, K, T, V]

The losses of realm_jax/objectives/rag.py take (logits, targets, scores) from here. The
inputs are built on the host: `retrieve` (documents and their embeddings), then
`build_contexts` (from strings) or `join_context_ids` (from token ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from realm_jax.models.bart import Bart, BartConfig
from realm_jax.models.layers import Replaceable
from realm_jax.models.towers import Embedder, EmbedderConfig, relevance_scores

Array = jax.Array

RAG_ARCHITECTURES = ("RagTokenForGeneration", "RagSequenceForGeneration", "RagModel")


@dataclasses.dataclass(frozen=True)
class RagConfig(Replaceable):
    """A RAG model: question encoder (DPR: CLS pooling) + BART generator.

    n_docs: documents per question (K). title_sep / doc_sep / max_combined_length / prefix:
    how contexts are built (`prefix + title + title_sep + text + doc_sep + question`, at
    most `max_combined_length` generator tokens). forced_bos_token_id /
    forced_eos_token_id: the generation defaults of the checkpoint (BART's: no forced bos,
    eos forced at the last position); see realm_jax/decode.py.
    """
    question_encoder: EmbedderConfig
    generator: BartConfig
    n_docs: int = 5
    title_sep: str = " / "
    doc_sep: str = " // "
    max_combined_length: int = 300
    prefix: str = ""
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    hf_architecture: str = "RagTokenForGeneration"   # what hf.save writes

    def __post_init__(self):
        if self.n_docs < 1:
            raise ValueError(f"n_docs must be >= 1, got {self.n_docs}")
        if self.hf_architecture not in RAG_ARCHITECTURES:
            raise ValueError(f"hf_architecture must be one of {RAG_ARCHITECTURES}, "
                             f"got {self.hf_architecture!r}")

    @property
    def retrieval_dim(self) -> int:
        """P: the size of question and document embeddings."""
        return self.question_encoder.output_dim

    def module(self) -> "Rag":
        return Rag(self)

    def example_inputs(self) -> dict:
        k, ids = self.n_docs, np.zeros((1, 2), np.int32)
        ctx = np.zeros((1, k, 2), np.int32)
        return dict(question_ids=ids, question_mask=np.ones_like(ids),
                    doc_embeddings=np.zeros((1, k, self.retrieval_dim), np.float32),
                    context_ids=ctx, context_mask=np.ones_like(ctx), decoder_input_ids=ids)


class RagOutput(NamedTuple):
    logits: Array       # [B, K, T, V] float32: generator logits per document
    doc_scores: Array   # [B, K] float32: question . document, from the live question encoder


def check_contexts(context_ids: Array, context_mask: Array | None,
                   doc_scores: Array | None = None) -> Array:
    """The context mask (all ones for None) after checking the shapes: context_ids [B, K, L],
    a mask alike and doc_scores [B, K]."""
    if context_ids.ndim != 3:
        raise ValueError(f"context_ids must be [B, K, L], got shape {context_ids.shape}")
    if doc_scores is not None and doc_scores.shape != context_ids.shape[:2]:
        raise ValueError(f"doc_scores {doc_scores.shape} do not match context_ids "
                         f"{context_ids.shape} (want [B, K])")
    if context_mask is None:
        return jnp.ones_like(context_ids)
    if context_mask.shape != context_ids.shape:
        raise ValueError(f"context_mask {context_mask.shape} does not match context_ids "
                         f"{context_ids.shape}")
    return context_mask


class Rag(nn.Module):
    """Question encoder + BART generator over B questions x K retrieved documents.

    Parameters: {"question_encoder": Embedder params, "generator": Bart params}. The
    methods are the pieces of `__call__` (for decoding: `encode_contexts` once, then the
    generator's cached `Bart.decode` steps through `generator`)."""
    config: RagConfig

    def setup(self):
        self.question_encoder = Embedder(self.config.question_encoder)
        self.generator = Bart(self.config.generator)

    def embed_questions(self, question_ids: Array, question_mask: Array | None = None, *,
                        deterministic: bool = True) -> Array:
        """Question embeddings [B, P] (float32)."""
        return self.question_encoder(question_ids, question_mask, deterministic=deterministic)

    def doc_scores(self, question_ids: Array, question_mask: Array | None,
                   doc_embeddings: Array, *, deterministic: bool = True) -> Array:
        """Retrieval scores [B, K]: the live question embedding . the (frozen) documents'
        embeddings [B, K, P]."""
        q = self.embed_questions(question_ids, question_mask, deterministic=deterministic)
        if doc_embeddings.ndim != 3 or doc_embeddings.shape[0] != q.shape[0] \
                or doc_embeddings.shape[2] != q.shape[1]:
            raise ValueError(f"doc_embeddings must be [B, K, P] = [{q.shape[0]}, K, "
                             f"{q.shape[1]}], got {doc_embeddings.shape}")
        docs = jax.lax.stop_gradient(doc_embeddings.astype(jnp.float32))
        return nn.with_logical_constraint(relevance_scores(q, docs), ("batch", None))

    def encode_contexts(self, context_ids: Array, context_mask: Array | None = None, *,
                        deterministic: bool = True) -> Array:
        """Generator encoder states [B * K, L, D] of the contexts [B, K, L] (the documents
        of a question contiguous, as Hugging Face lays them out)."""
        context_mask = check_contexts(context_ids, context_mask)
        b, k, length = context_ids.shape
        return self.generator.encode(context_ids.reshape(b * k, length),
                                     context_mask.reshape(b * k, length),
                                     deterministic=deterministic)

    def generator_logits(self, context_ids: Array, context_mask: Array | None,
                         decoder_input_ids: Array, decoder_attention_mask: Array | None = None,
                         *, deterministic: bool = True) -> Array:
        """Teacher-forced generator logits [B, K, T, V] (float32): decoder inputs [B, T]
        (the same for every document) against each of the K contexts [B, K, L]."""
        context_mask = check_contexts(context_ids, context_mask)
        b, k, length = context_ids.shape
        if decoder_input_ids.ndim != 2 or decoder_input_ids.shape[0] != b:
            raise ValueError(f"decoder_input_ids must be [B={b}, T], got "
                             f"{decoder_input_ids.shape}")
        states = self.encode_contexts(context_ids, context_mask, deterministic=deterministic)
        dec = jnp.repeat(decoder_input_ids, k, axis=0)
        dec_mask = (None if decoder_attention_mask is None
                    else jnp.repeat(decoder_attention_mask, k, axis=0))
        logits = self.generator.decode(dec, states, context_mask.reshape(b * k, length),
                                       dec_mask, deterministic=deterministic)
        logits = logits.reshape((b, k) + logits.shape[1:])
        return nn.with_logical_constraint(logits, ("batch", None, "length", "vocab"))

    def __call__(self, question_ids: Array, question_mask: Array | None, doc_embeddings: Array,
                 context_ids: Array, context_mask: Array | None, decoder_input_ids: Array,
                 decoder_attention_mask: Array | None = None, *,
                 deterministic: bool = True) -> RagOutput:
        """question_ids [B, S], doc_embeddings [B, K, P], contexts [B, K, L], decoder inputs
        [B, T] -> RagOutput(logits [B, K, T, V], doc_scores [B, K])."""
        scores = self.doc_scores(question_ids, question_mask, doc_embeddings,
                                 deterministic=deterministic)
        logits = self.generator_logits(context_ids, context_mask, decoder_input_ids,
                                       decoder_attention_mask, deterministic=deterministic)
        return RagOutput(logits, scores)


# ---------------------------------------------------------------------------------------
# Host side: retrieval and contexts


class _Searcher(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class _Passages(Protocol):
    def title(self, i: int) -> str: ...
    def text(self, i: int) -> str: ...


class Retrieved(NamedTuple):
    doc_ids: np.ndarray          # [B, K] int64 block ids (-1: no document)
    index_scores: np.ndarray     # [B, K] float32 scores as the index gave them
    doc_embeddings: np.ndarray   # [B, K, P] float32 (zeros where there is no document)


def retrieve(searcher: _Searcher, question_embeddings: Any, doc_embeddings: Any,
             n_docs: int) -> Retrieved:
    """Top-`n_docs` documents of each question from any searcher of realm_jax.index
    (`ScannSearcher`, `DeviceSearcher`, `NumpySearcher`), with their embeddings gathered
    from the corpus matrix `doc_embeddings` [N, P] (rows = block ids: a numpy or memory-
    mapped array, or a DeviceSearcher's `embeddings`)."""
    q = np.asarray(question_embeddings, np.float32)
    if q.ndim != 2:
        raise ValueError(f"question_embeddings must be [B, P], got shape {q.shape}")
    scores, ids = searcher.search(q, n_docs)
    ids = np.asarray(ids, np.int64)
    if ids.shape != (q.shape[0], n_docs):
        raise ValueError(f"the searcher returned ids of shape {ids.shape}, "
                         f"want {(q.shape[0], n_docs)}")
    n = int(doc_embeddings.shape[0])
    if np.any(ids >= n):
        raise ValueError(f"the searcher returned block ids up to {ids.max()}, but the "
                         f"embedding matrix has {n} rows")
    rows = np.clip(ids, 0, None).reshape(-1)
    gathered = np.array(jax.device_get(doc_embeddings[rows]), np.float32)   # (a copy)
    gathered = gathered.reshape(ids.shape + (gathered.shape[-1],))
    gathered[ids < 0] = 0.0
    return Retrieved(ids, np.asarray(scores, np.float32), gathered)


def context_string(title: str, text: str, question: str, *, title_sep: str = " / ",
                   doc_sep: str = " // ", prefix: str = "") -> str:
    """One RAG context, as Hugging Face's RagRetriever joins it: surrounding quotes of the
    title dropped, `prefix + title + title_sep + text + doc_sep + question`, and double
    blanks made single."""
    title = title.removeprefix('"').removesuffix('"')
    return (prefix + title + title_sep + text + doc_sep + question).replace("  ", " ")


def build_contexts(passages: _Passages, doc_ids: np.ndarray, questions: Sequence[str],
                   tokenizer: Any, config: RagConfig, max_length: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized contexts (ids [B, K, L], mask [B, K, L], int32) of the retrieved
    documents `doc_ids` [B, K] of a BlockStore (anything with `title(i)` and `text(i)`),
    each joined to its question string and tokenized by the generator's tokenizer (a
    transformers tokenizer), padded and truncated to L = `max_length` (default
    `config.max_combined_length`) as RagRetriever does (truncation cuts the end, so a
    long passage may cut the question: keep passages short). A missing document (id -1)
    contributes an empty title and text."""
    doc_ids = np.asarray(doc_ids)
    if doc_ids.ndim != 2 or doc_ids.shape[0] != len(questions):
        raise ValueError(f"doc_ids must be [B={len(questions)}, K], got shape {doc_ids.shape}")
    length = max_length or config.max_combined_length
    strings = []
    for row, question in zip(doc_ids.tolist(), questions):
        for i in row:
            title, text = (passages.title(i), passages.text(i)) if i >= 0 else ("", "")
            strings.append(context_string(title, text, question, title_sep=config.title_sep,
                                          doc_sep=config.doc_sep, prefix=config.prefix))
    enc = tokenizer(strings, max_length=length, padding="max_length", truncation=True,
                    return_tensors="np")
    shape = doc_ids.shape + (length,)
    return (np.asarray(enc["input_ids"], np.int32).reshape(shape),
            np.asarray(enc["attention_mask"], np.int32).reshape(shape))


def join_context_ids(doc_tokens: Sequence[Sequence[Sequence[int]]],
                     question_tokens: Sequence[Sequence[int]], *, doc_sep_ids: Sequence[int],
                     max_length: int, pad_id: int, bos_id: int | None = None,
                     eos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Contexts from token ids already in the generator's vocabulary:
    `[bos] + doc + doc_sep_ids + question + [eos]` per (question, document), the documents'
    tokens holding `title + title_sep + text`; cut at the end to `max_length` (keeping the
    eos), right-padded. doc_tokens [B][K][...], question_tokens [B][...] -> (ids [B, K, L],
    mask [B, K, L]) int32."""
    if len(doc_tokens) != len(question_tokens):
        raise ValueError(f"{len(doc_tokens)} document lists for {len(question_tokens)} questions")
    ks = {len(docs) for docs in doc_tokens}
    if len(ks) != 1:
        raise ValueError(f"every question needs the same number of documents, got {sorted(ks)}")
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    room = max_length - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for tokens")
    k = ks.pop()
    ids = np.full((len(doc_tokens), k, max_length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for b, (docs, question) in enumerate(zip(doc_tokens, question_tokens)):
        for j, doc in enumerate(docs):
            seq = head + (list(doc) + list(doc_sep_ids) + list(question))[:room] + tail
            ids[b, j, :len(seq)] = seq
            mask[b, j, :len(seq)] = 1
    return ids, mask
