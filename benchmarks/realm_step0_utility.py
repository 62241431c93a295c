"""Does the held-out retrieval utility at step 0 depend on what is retrieved?

The demo's REALM model at initialisation (all-MiniLM-L6-v2 towers and reader, the reader's
MLM head new) scores realm_heldout's held-out queries twice: with the candidates the index
retrieves, and with random blocks in their place (`--trials` draws). The token-weighted
retrieval utility (marginal minus null-document log-likelihood) is reported over all queries
and over the answerable and unanswerable ones. The corpus and the initial index are made
as realm_heldout.py makes them, in a temporary folder, or taken from (or kept in) --workdir:

    python benchmarks/realm_step0_utility.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from common import Report, add_markdown_flag, minilm_folder
from realm_heldout import demo_config, prepare_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="",
                        help="corpus and index of a realm_heldout.py --workdir (made there "
                             "when missing); default: a temporary folder")
    parser.add_argument("--articles", type=int, default=0,
                        help="the first N articles of the sample (0: all)")
    parser.add_argument("--eval_queries", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=2, help="draws of random candidates")
    add_markdown_flag(parser)
    args = parser.parse_args()

    from realm_jax import sharding
    from realm_jax.data.realm_examples import QueryMaker, candidate_tokens
    from realm_jax.index.store import IndexStore
    from realm_jax.train import heldout, realm

    root = Path(args.workdir or tempfile.mkdtemp(prefix="realm_step0_"))
    config = demo_config(root)
    rc = config.retrieval
    store = prepare_run(root, config, args.articles)
    maker = QueryMaker.for_store(store, minilm_folder(), query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    configs, params = realm.build_models(config)
    _, held = heldout.split_blocks(store, config.data.heldout_fraction)
    queries = heldout.heldout_queries(store, maker, held, args.eval_queries, config.seed)
    finder = realm.AnswerFinder(store, rc.exclude)
    answerable = np.array([finder(q) for q in queries])
    snapshot = IndexStore(root / "run" / "index").latest()
    retriever = realm.HostRetriever.from_config(rc, snapshot, configs["query_tower"],
                                                params["query_tower"], store)
    # The trainer's own held-out evaluation, its candidates given by `retriever`.
    mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
    evaluate = heldout.HeldoutEval(
        realm.RealmLossFn.from_config(rc, configs, maker.special, mode="scann"), queries,
        mesh=mesh, param_shardings=realm.param_shardings(configs, mesh, rules),
        answerable=answerable)
    rng = np.random.default_rng(0)

    def random_blocks(batch: dict) -> dict:
        """The retrieved candidates, each replaced by a random block (the null document and
        empty slots stay as they are)."""
        batch = retriever(batch)
        ids = batch["cand_ids"].copy()
        real = ids >= 0
        ids[real] = rng.integers(0, len(store), int(real.sum()))
        tokens, lengths = candidate_tokens(store, ids, max_length=rc.block_length)
        return dict(batch, cand_ids=ids, cand_tokens=tokens, cand_lengths=lengths)

    def utilities(candidates) -> list[str]:
        with sharding.activate(mesh, rules):
            values = evaluate(params, retriever=candidates)
        return [f"{values[f'heldout_{name}retrieval_utility']:+.4f}"
                for name in ("", "answerable_", "unanswerable_")]

    rows = [("retrieved by the index", *utilities(retriever))]
    rows += [(f"random blocks (draw {trial + 1})", *utilities(random_blocks))
             for trial in range(args.trials)]

    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    report = Report()
    report.text(f"{len(store)} blocks, {len(queries)} held-out queries ({answerable.sum()} "
                f"answerable), {rc.num_candidates} candidates each (the null document "
                f"included); parameters at initialisation.")
    report.table(["candidates", "utility: all", "answerable", "unanswerable"], rows)
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
