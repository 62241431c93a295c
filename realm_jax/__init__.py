"""realm-jax: retrieval-augmented language models (REALM, ORQA, RAG) in JAX/Flax."""

from realm_jax.embedding import TextEmbedder

__all__ = ["TextEmbedder"]
__version__ = "0.1.0"
