"""Does the held-out retrieval utility at step 0 depend on what is retrieved?

The demo's REALM model at initialisation (all-MiniLM-L6-v2 towers and reader, the reader's
MLM head new) scores realm_heldout's held-out queries twice: with the candidates the index
retrieves, and with random blocks in their place (`--trials` draws; see
realm_heldout.random_block_control). The token-weighted retrieval utility (marginal minus
null-document log-likelihood) is reported over all queries and over the answerable and
unanswerable ones. The corpus and the initial index are made as realm_heldout.py makes
them, in a temporary folder, or taken from (or kept in) --workdir:

    python benchmarks/realm_step0_utility.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import Report, add_markdown_flag
from realm_heldout import CONTROL_COLUMNS, demo_config, prepare_run, random_block_control


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

    from realm_jax.tasks import realm

    root = Path(args.workdir or tempfile.mkdtemp(prefix="realm_step0_"))
    config = demo_config(root)
    store = prepare_run(root, config, args.articles)
    _, params = realm.build_models(config)
    rows, queries, answerable = random_block_control(
        root, config, store, [("step 0", params)], args.eval_queries, args.trials)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    report = Report()
    report.text(f"{len(store)} blocks, {queries} held-out queries ({answerable} answerable), "
                f"{config.retrieval.num_candidates} candidates each (the null document "
                f"included); parameters at initialisation.")
    report.table(CONTROL_COLUMNS, rows)
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
