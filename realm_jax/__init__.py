"""realm-jax: retrieval-augmented language models (REALM, ORQA, RAG) in JAX/Flax.

The top-level names load lazily, so light modules (e.g. the index store) import without
pulling in JAX."""

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {"TextEmbedder": "realm_jax.embedding"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'realm_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
