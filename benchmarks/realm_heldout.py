"""Does REALM pre-training on the Wikipedia sample make retrieval more useful for masked
sentences it never trained on?

The demo's REALM setup (configs/demo_realm_minilm.py: all-MiniLM-L6-v2 towers and reader,
the reader's MLM head new) on the whole sample (or its first --articles articles), trained
by the real trainer against the index published from the initial document tower (no
refresher: every step sees the same index), with the held-out evaluation of
`train/heldout.py` at step 0 and every --eval_every steps: held-out loss and retrieval utility, and the utility's change
since step 0, paired over the same held-out queries, with its standard error.

    python benchmarks/realm_heldout.py --steps 1600 --eval_every 400 --eval_queries 1000

(the documented run; --tower_lr F overrides the config's learning-rate multiplier of
both towers, 0.1 in the demo config).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Report, add_markdown_flag, minilm_folder, wiki_sample_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--eval_queries", type=int, default=64)
    parser.add_argument("--articles", type=int, default=0,
                        help="the first N articles of the sample (0: all)")
    parser.add_argument("--tower_lr", type=float, default=None,
                        help="train.lr_multipliers of both towers (default: the config's)")
    add_markdown_flag(parser)
    args = parser.parse_args()

    from realm_jax import config as config_lib
    from realm_jax import refresh
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    model = minilm_folder()
    root = Path(tempfile.mkdtemp(prefix="realm_heldout_"))
    overrides = [f"data.corpus={root / 'corpus'}", f"data.tokenizer={model}",
                 f"model.init_from_hf={model}", f"train.steps={args.steps}",
                 f"train.eval_every={args.eval_every}",
                 f"train.eval_queries={args.eval_queries}",
                 f"train.checkpoint_every={args.steps}", "train.log_every=10"]
    if args.tower_lr is not None:
        overrides += [f"train.lr_multipliers.{part}={args.tower_lr}"
                      for part in ("query_tower", "doc_tower")]
    config = config_lib.load_config("demo_realm_minilm", *overrides)
    corpus = prepare_corpus(wiki_sample_path(), root / "corpus", tokenizer=model,
                            mode="realm", max_tokens=config.retrieval.block_length,
                            max_documents=args.articles or None, progress=False)
    refresh.publish_initial_index(config, root / "run" / "index")
    started = time.perf_counter()
    trainer.train(config, root / "run")
    minutes = (time.perf_counter() - started) / 60
    rows = read_metrics(root / "run")
    shutil.rmtree(root, ignore_errors=True)  # the corpus, index and checkpoints: ~1 GB
    evals = [r for r in rows if "heldout_loss" in r]
    train = [r["loss"] for r in rows if "loss" in r]

    report = Report()
    lr = config.train.lr_multipliers
    report.text(
        f"{corpus.num_documents} articles ({corpus.num_blocks} blocks), {config.train.steps} "
        f"steps of {config.train.batch_size} queries ({minutes:.0f} min), learning rate "
        f"{config.train.learning_rate:g} x "
        f"(query tower {lr.query_tower:g}, document tower {lr.doc_tower:g}, reader "
        f"{lr.reader:g}); {int(evals[0]['heldout_queries'])} held-out queries "
        f"({int(evals[0]['heldout_masked_tokens'])} masked tokens) from the "
        f"{config.data.heldout_fraction:.0%} of documents held out of training; training loss "
        f"(mean of the first and last 5 logged steps) {np.mean(train[:5]):.2f} -> "
        f"{np.mean(train[-5:]):.2f}.")
    table = []
    for r in evals:
        change = (f"{r['heldout_retrieval_utility_change']:+.4f} "
                  f"± {r['heldout_retrieval_utility_change_se']:.4f}"
                  if "heldout_retrieval_utility_change" in r else "")
        table.append((r["step"], f"{r['heldout_loss']:.3f}",
                      f"{r['heldout_retrieval_utility']:+.4f}", change))
    report.table(["step", "held-out loss", "held-out retrieval utility",
                  "change since step 0 (± standard error)"], table)
    last = evals[-1]
    if last.get("heldout_retrieval_utility_change_se", 0) > 0:
        change, se = (last["heldout_retrieval_utility_change"],
                      last["heldout_retrieval_utility_change_se"])
        report.text(f"At the end the held-out retrieval utility changed by {change:+.4f} "
                    f"({change / se:+.1f} standard errors).")
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
