"""Corpus block store: readers (JSONL, TFDS, Wikipedia XML), block splitting, the store."""

from realm_jax.data.blocks import TokenizerInfo, load_tokenizer
from realm_jax.data.corpus import PrepareResult, prepare_corpus
from realm_jax.data.readers import (Document, SkipCounter, read_data_source, read_documents,
                                    read_jsonl, read_tfds, read_wiki_xml)
from realm_jax.data.store import BlockRecord, BlockStore, BlockStoreWriter
from realm_jax.data.wikitext import Span, wikitext_to_text

__all__ = [
    "BlockRecord", "BlockStore", "BlockStoreWriter", "Document", "PrepareResult", "SkipCounter",
    "Span", "TokenizerInfo", "load_tokenizer", "prepare_corpus", "read_data_source",
    "read_documents", "read_jsonl", "read_tfds", "read_wiki_xml", "wikitext_to_text",
]
