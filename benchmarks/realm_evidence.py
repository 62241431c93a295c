"""How often can retrieval help REALM's held-out masked sentences on the Wikipedia sample?

For the held-out masked queries the trainer evaluates (`train/heldout.py`), the fraction
whose masked span (the exact wordpieces) appears in a block the initial MiniLM query tower
retrieves through the ScaNN index, with the query's source excluded as in training
(`--exclude`: its block, the default, or its whole document). A query whose answer is in
no candidate cannot gain from retrieval, so this bounds how far the held-out
retrieval_utility can rise on this corpus.

    python benchmarks/realm_evidence.py [--articles 20 --candidates 3 --exclude block]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import minilm_folder, publish_initial_realm_index, wiki_sample_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--articles", type=int, default=20, help="articles of the sample")
    parser.add_argument("--candidates", type=int, default=3,
                        help="retrieval.num_candidates (the null document included)")
    parser.add_argument("--exclude", choices=("block", "document"), default="block",
                        help="retrieval.exclude: the query's own block, or its whole document")
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()

    from realm_jax import config as config_lib
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.data.realm_examples import QueryMaker, collate_queries
    from realm_jax.data.store import BlockStore
    from realm_jax.index.store import IndexStore
    from realm_jax.tasks import heldout, realm

    model = minilm_folder()
    root = Path(tempfile.mkdtemp(prefix="realm_evidence_"))
    config = config_lib.load_config(
        "realm:demo", f"data.corpus={root / 'corpus'}", f"data.tokenizer={model}",
        f"model.init_from_hf={model}", f"retrieval.num_candidates={args.candidates}",
        f"retrieval.exclude={args.exclude}")
    rc = config.retrieval
    prepare_corpus(wiki_sample_path(), root / "corpus", tokenizer=model, mode="realm",
                   max_tokens=rc.block_length, max_documents=args.articles, progress=False)
    publish_initial_realm_index(config, root / "index")
    store = BlockStore.open(root / "corpus")
    maker = QueryMaker.for_store(store, model, query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    _, held = heldout.split_blocks(store, config.data.heldout_fraction)
    queries = heldout.heldout_queries(store, maker, held, args.queries, config.seed)
    configs, params = realm.build_models(config)
    retriever = realm.HostRetriever.from_config(rc, IndexStore(root / "index").latest(),
                                                configs["query_tower"], params["query_tower"],
                                                store)
    candidates = retriever(collate_queries(queries))["cand_ids"][:, 1:]  # the null one dropped
    finder = realm.AnswerFinder(store, rc.exclude)
    in_top = sum(finder.in_blocks(q, ids[:1]) for q, ids in zip(queries, candidates))
    in_any = sum(finder.in_blocks(q, ids) for q, ids in zip(queries, candidates))
    n = len(queries)
    print(f"{args.articles} articles ({len(store)} blocks), {n} held-out queries, "
          f"{args.candidates - 1} retrieved blocks, source {args.exclude} excluded: the masked "
          f"span is in the top block for {in_top / n:.0%}, in some block for {in_any / n:.0%}")


if __name__ == "__main__":
    main()
