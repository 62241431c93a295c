"""Fixed-length model rows for the retriever towers: ``[CLS] text [SEP]`` and
``[CLS] title [SEP] text [SEP]``, the layouts the corpus embedder builds from a block store
(`realm_jax.index.embed_corpus.RowBuilder`): a title keeps at most ``length // 2`` tokens
and a long row loses the end of its text, so a tower trained on these rows sees passages as
the index embeds them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def row(text_ids: Sequence[int], length: int, *, cls_id: int, sep_id: int, pad_id: int = 0,
        title_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int32 [length] each: ``[CLS] text [SEP]``, or
    ``[CLS] title [SEP] text [SEP]`` when ``title_ids`` is given, padded with ``pad_id``."""
    text = np.asarray(text_ids, np.int32).reshape(-1)
    if title_ids is None:
        if length < 2:
            raise ValueError(f"row length must be >= 2, got {length}")
        ids = np.concatenate([[cls_id], text[:length - 2], [sep_id]])
    else:
        if length < 4:
            raise ValueError(f"a titled row's length must be >= 4, got {length}")
        title = np.asarray(title_ids, np.int32).reshape(-1)[:length // 2]
        ids = np.concatenate([[cls_id], title, [sep_id], text[:length - 3 - len(title)],
                              [sep_id]])
    out = np.full(length, pad_id, np.int32)
    out[:len(ids)] = ids
    mask = np.zeros(length, np.int32)
    mask[:len(ids)] = 1
    return out, mask
