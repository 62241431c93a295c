"""RAG-Sequence on Natural Questions at the paper's size (configs/rag_token_nq.py with the
RAG-Sequence loss; 50 documents and thorough decoding in evaluation)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "rag_token_nq", Path(__file__).with_name("rag_token_nq.py"))
_token = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_token)


def get_config(arg=None):
    return _token.get_config("sequence")
