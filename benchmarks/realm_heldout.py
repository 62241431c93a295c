"""Does REALM pre-training on the Wikipedia sample make retrieval more useful for masked
sentences it never trained on?

The demo's REALM setup (configs/realm.py:demo: all-MiniLM-L6-v2 towers and reader,
the reader's MLM head new) on the whole sample (or its first --articles articles), trained
by the real trainer against the index published from the initial document tower (no
refresher: every step sees the same index), with the held-out evaluation of
`train/heldout.py` at step 0 and every --eval_every steps: held-out loss and retrieval
utility, and the utility's change since step 0, paired over the same held-out queries, with
its standard error; the same over the answerable queries alone (those whose masked span a
readable block holds, `realm.AnswerFinder`) and over the unanswerable rest. With
--answerable_only the training queries are such queries too (`data.answerable_only`).
In scann mode the index and the query tower that searches it are those of step 0 throughout
(the snapshot's own), so every step retrieves the same candidates for a query; the live
towers only weigh them against each other and the null document. With --mode device the
live query tower searches the (step 0) index, so what it retrieves can change, which the
held-out answer recall measures.

--reader_warmup N first makes the reader a masked LM, as REALM's BERT reader is and
MiniLM's is not (`warm_up_reader`); step 0 is then the model after it. --random_blocks N
ends the run with a control: step 0's and the last step's models score the held-out queries
again with random blocks in place of the retrieved ones (`random_block_control`).

    python benchmarks/realm_heldout.py

(the documented run: its defaults are --steps 1600 --eval_every 400 --eval_queries 1000;
--tower_lr F overrides the config's learning-rate multiplier of
both towers, 0.1 in the demo config).

With --workdir DIR the corpus, the index, the checkpoints (every --checkpoint_every
steps) and the metrics are kept in DIR, and running the same command again resumes the run
where its last checkpoint left it: a run longer than one sitting can be done in parts (the
held-out change is still measured from step 0, whose evaluation is kept in the workdir;
each resumed part also evaluates at the step it starts from).
Without it, everything goes to a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (Report, add_markdown_flag, minilm_folder, publish_initial_realm_index,
                    wiki_sample_path)


RUN_FLAGS = ("steps", "eval_every", "eval_queries", "articles", "tower_lr", "answerable_only",
             "reader_warmup", "warmup_batch", "num_candidates", "mode")


def check_same_run(root: Path, args: argparse.Namespace) -> None:
    """A kept workdir resumes only the run it was started for: the flags that shape the run
    are written there the first time and must match on every later call."""
    wanted = {flag: getattr(args, flag) for flag in RUN_FLAGS}
    path = root / "realm_heldout_args.json"
    if path.exists():
        kept = json.loads(path.read_text())
        differ = [f"--{flag} {kept.get(flag)} (now {wanted[flag]})" for flag in RUN_FLAGS
                  if kept.get(flag) != wanted[flag]]
        if differ:
            raise SystemExit(f"--workdir {root} holds a run started with "
                             f"{', '.join(differ)}: pass the same flags or another --workdir")
    else:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted))


def demo_config(root: Path, *overrides: str):
    """The demo's REALM config over the corpus in `root` (MiniLM towers and reader)."""
    from realm_jax import config as config_lib

    model = minilm_folder()
    return config_lib.load_config(
        "realm:demo", f"data.corpus={root / 'corpus'}", f"data.tokenizer={model}",
        f"model.init_from_hf={model}", *overrides)


def prepare_run(root: Path, config, articles: int):
    """The block store of the sample (its first `articles`, 0: all) in root/corpus and the
    index of the initial document tower in root/run/index, each made unless already there
    (a kept workdir reuses them); returns the opened store."""
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.data.store import BlockStore
    from realm_jax.index.store import IndexStore

    if not (root / "corpus").exists():
        prepare_corpus(wiki_sample_path(), root / "corpus", tokenizer=minilm_folder(),
                       mode="realm", max_tokens=config.retrieval.block_length,
                       max_documents=articles or None, progress=False)
    if IndexStore(root / "run" / "index").latest_version() is None:
        publish_initial_realm_index(config, root / "run" / "index")
    return BlockStore.open(root / "corpus")


def random_block_control(root: Path, config, store, param_sets, eval_queries: int,
                         trials: int) -> tuple[list[tuple], int, int]:
    """(table rows, held-out queries, answerable ones). Each (label, params) of `param_sets`
    scores the held-out queries through the trainer's own held-out evaluation, with the
    candidates the index in root/run/index retrieves (queries embedded as the trainer embeds
    them: in scann mode with the query tower of the first params, the index's own, step
    0's; in device mode with each params' own) and with `trials` draws of random blocks in
    their place; a row per scoring: (candidates, answer recall, utility over all /
    answerable / unanswerable queries, the changes from the retrieved candidates).
    Utility that random blocks give as well is not retrieval's doing."""
    from realm_jax import sharding
    from realm_jax.data.realm_examples import QueryMaker, candidate_tokens
    from realm_jax.index.store import IndexStore
    from realm_jax.tasks import heldout, realm

    rc = config.retrieval
    maker = QueryMaker.for_store(store, minilm_folder(), query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    configs = realm.model_configs(config)
    _, held = heldout.split_blocks(store, config.data.heldout_fraction)
    queries = heldout.heldout_queries(store, maker, held, eval_queries, config.seed)
    snapshot = IndexStore(root / "run" / "index").latest()

    def searching_with(params) -> realm.HostRetriever:
        return realm.HostRetriever.from_config(rc, snapshot, configs["query_tower"],
                                               params["query_tower"], store)

    retriever = None  # the first params' (the index's own), or in device mode each params'
    mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
    evaluate = heldout.HeldoutEval(
        realm.RealmLossFn.from_config(rc, configs, maker.special, mode="scann"), queries,
        mesh=mesh, param_shardings=sharding.part_shardings(configs, mesh, rules),
        finder=realm.AnswerFinder(store, rc.exclude))
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

    def utilities(params, candidates) -> list[str]:
        """The utilities, then (random blocks) their change from the retrieved candidates'
        with its standard error, paired over the queries (HeldoutEval's change since its
        first evaluation)."""
        with sharding.activate(mesh, rules):
            values = evaluate(params, retriever=candidates)
        names = ("", "answerable_", "unanswerable_")
        out = [f"{values['heldout_answer_recall']:.3f}"]
        out += [f"{values[f'heldout_{name}retrieval_utility']:+.4f}" for name in names]
        return out + [change_text(values, f"heldout_{name}retrieval_utility") for name in names]

    rows = []
    for label, params in param_sets:
        if retriever is None or rc.mode == "device":
            retriever = searching_with(params)
        evaluate.reset_baseline()  # the changes below are from these params' retrieved ones
        rows.append((f"{label}: retrieved by the index", *utilities(params, retriever)))
        rows += [(f"{label}: random blocks (draw {trial + 1})",
                  *utilities(params, random_blocks)) for trial in range(trials)]
    return rows, len(queries), int(evaluate.answerable.sum())


def change_text(values: dict, key: str) -> str:
    """`values[key + "_change"]` with its standard error as text: "" when not measured, the
    error left out when undefined (nan, over a single query)."""
    if key + "_change" not in values:
        return ""
    se = values[key + "_change_se"]
    return f"{values[key + '_change']:+.4f}" + (f" ± {se:.4f}" if np.isfinite(se) else "")


CONTROL_COLUMNS = ["params: candidates", "answer recall", "utility: all", "answerable",
                   "unanswerable", "all: change from retrieved",
                   "answerable: change from retrieved", "unanswerable: change from retrieved"]


def warm_up_reader(root: Path, steps: int, batch_size: int) -> Path:
    """The reader made a masked LM before REALM starts, as REALM's BERT reader is: `steps`
    of the trainer with the null document as the only candidate (retrieval.num_candidates=1,
    so the loss is the plain MLM loss of the training documents' salient spans) and both
    towers frozen, in root/warmup; its reader exported to root/reader_mlm, the folder
    returned (a kept workdir reuses it)."""
    from realm_jax.train import trainer
    from realm_jax.checkpoints import export_part

    out = root / "reader_mlm"
    if out.exists():
        return out
    config = demo_config(
        root, f"train.steps={steps}", f"train.batch_size={batch_size}",
        "retrieval.num_candidates=1", "train.lr_multipliers.query_tower=0",
        "train.lr_multipliers.doc_tower=0", "train.eval_queries=0",
        f"train.checkpoint_every={min(steps, 200)}", "train.log_every=10")
    work = root / "warmup"
    work.mkdir(exist_ok=True)
    if not (work / "index").exists():  # the trainer reads its workdir's index (unused at K=1)
        (work / "index").symlink_to(root / "run" / "index", target_is_directory=True)
    trainer.train(config, work)
    return export_part(work, "reader", out)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--eval_every", type=int, default=400)
    parser.add_argument("--eval_queries", type=int, default=1000)
    parser.add_argument("--articles", type=int, default=0,
                        help="the first N articles of the sample (0: all)")
    parser.add_argument("--tower_lr", type=float, default=None,
                        help="train.lr_multipliers of both towers (default: the config's)")
    parser.add_argument("--num_candidates", type=int, default=None,
                        help="retrieval.num_candidates, the null document included "
                             "(default: the config's)")
    parser.add_argument("--mode", choices=("scann", "device"), default=None,
                        help="retrieval.mode (default: the config's, scann)")
    parser.add_argument("--answerable_only", action="store_true",
                        help="train only on queries whose masked span occurs in a block they "
                             "may read (data.answerable_only)")
    parser.add_argument("--reader_warmup", type=int, default=0,
                        help="first train the reader alone as a masked LM for this many steps "
                             "(null document only, towers frozen; see warm_up_reader) and start "
                             "REALM from it; step 0 is then the warmed-up model")
    parser.add_argument("--warmup_batch", type=int, default=8,
                        help="queries per warm-up step")
    parser.add_argument("--random_blocks", type=int, default=0,
                        help="at the end, also score the held-out queries at step 0 and at "
                             "the last step with this many draws of random blocks in place of "
                             "the retrieved candidates (random_block_control)")
    parser.add_argument("--stop_after", type=int, default=None,
                        help="stop at this step (with --workdir, the same command without it "
                             "resumes the run later)")
    parser.add_argument("--workdir", default="",
                        help="keep the run in this folder and resume it from there "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--checkpoint_every", type=int, default=0,
                        help="steps between checkpoints (default: 200 with --workdir, "
                             "else only at the end)")
    add_markdown_flag(parser)
    args = parser.parse_args()

    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    keep = bool(args.workdir)
    root = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="realm_heldout_"))
    checkpoint_every = args.checkpoint_every or (200 if keep else args.steps)
    if keep:
        check_same_run(root, args)
    overrides = [f"train.steps={args.steps}",
                 f"train.eval_every={args.eval_every}",
                 f"train.eval_queries={args.eval_queries}",
                 f"train.checkpoint_every={checkpoint_every}", "train.log_every=10"]
    if args.answerable_only:
        overrides.append("data.answerable_only=True")
    if args.mode is not None:
        overrides.append(f"retrieval.mode={args.mode}")
    if args.num_candidates is not None:
        overrides.append(f"retrieval.num_candidates={args.num_candidates}")
    if args.tower_lr is not None:
        overrides += [f"train.lr_multipliers.{part}={args.tower_lr}"
                      for part in ("query_tower", "doc_tower")]
    config = demo_config(root, *overrides)
    corpus = prepare_run(root, config, args.articles)
    started = time.perf_counter()
    if args.reader_warmup:
        reader = warm_up_reader(root, args.reader_warmup, args.warmup_batch)
        config = demo_config(root, *overrides, f"model.reader_hf={reader}")
        warmup_rows = read_metrics(root / "warmup")
    trainer.train(config, root / "run", stop_after=args.stop_after)
    minutes = (time.perf_counter() - started) / 60
    rows = read_metrics(root / "run")
    control = None
    if args.random_blocks and args.stop_after is None:
        from realm_jax.checkpoints import TrainCheckpoints

        with TrainCheckpoints(root / "run") as checkpoints:
            last = checkpoints.latest_step()
            # Step 0's checkpoint is kept: the index in use was embedded from it.
            param_sets = [(f"step {step}", checkpoints.restore_params(step))
                          for step in (0, last)]
        control = random_block_control(root, config, corpus, param_sets, args.eval_queries,
                                       args.random_blocks)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)  # the corpus, index and checkpoints: ~1 GB
    # A resumed run logs again the steps after its last checkpoint: the last row of a step
    # is the one that counts.
    evals = list({r["step"]: r for r in rows if "heldout_loss" in r}.values())
    train = list({r["step"]: r["loss"] for r in rows if "loss" in r}.values())

    report = Report()
    lr = config.train.lr_multipliers
    report.text(
        f"{corpus.manifest['num_documents']} articles ({len(corpus)} blocks), "
        f"{evals[-1]['step']} of {config.train.steps} steps of {config.train.batch_size} "
        f"{'answerable ' if args.answerable_only else ''}queries, "
        f"{config.retrieval.num_candidates} candidates each (the null document included), "
        f"retrieval mode {config.retrieval.mode} ({minutes:.0f} min"
        f"{' in this sitting' if keep else ''}), learning rate "
        f"{config.train.learning_rate:g} x "
        f"(query tower {lr.query_tower:g}, document tower {lr.doc_tower:g}, reader "
        f"{lr.reader:g}); {int(evals[0]['heldout_queries'])} held-out queries "
        f"({int(evals[0]['heldout_masked_tokens'])} masked tokens) from the "
        f"{config.data.heldout_fraction:.0%} of documents held out of training; training loss "
        f"(mean of the first and last 5 logged steps) {np.mean(train[:5]):.2f} -> "
        f"{np.mean(train[-5:]):.2f}.")
    if args.reader_warmup:
        warm = [r["loss"] for r in warmup_rows if "loss" in r]
        report.text(
            f"Step 0 is the model after a reader warm-up: {args.reader_warmup} steps of "
            f"{args.warmup_batch} training queries, the reader alone as a masked LM (the null "
            f"document its only candidate, towers frozen); its MLM loss "
            f"{np.mean(warm[:5]):.2f} -> {np.mean(warm[-5:]):.2f}.")
    def utility(r, prefix=""):
        """(utility, its change since step 0 ± standard error) of one evaluation's row."""
        key = f"heldout_{prefix}retrieval_utility"
        if key not in r:  # an evaluation logged before this split was reported
            return "", ""
        return f"{r[key]:+.4f}", change_text(r, key)

    # The null document's loss: the marginal loss plus the utility (both token means).
    table = [(r["step"], f"{r['heldout_answer_recall']:.3f}" if "heldout_answer_recall" in r
              else "", f"{r['heldout_loss']:.3f}",
              f"{r['heldout_loss'] + r['heldout_retrieval_utility']:.3f}", *utility(r),
              *utility(r, "answerable_"), *utility(r, "unanswerable_")) for r in evals]
    report.text(f"Answerable: the {int(evals[-1]['heldout_answerable_queries'])} held-out "
                f"queries whose masked wordpieces occur in a block they may read (not their "
                f"own {config.retrieval.exclude}), the only ones retrieval can help; "
                f"unanswerable: the other {int(evals[-1]['heldout_unanswerable_queries'])}. "
                f"Answer recall: the share of the answerable ones whose answer one of their "
                f"{config.retrieval.num_candidates - 1} retrieved candidates holds.")
    report.table(["step", "answer recall", "held-out loss", "null-document loss",
                  "retrieval utility", "change since step 0 (± standard error)",
                  "answerable: utility", "answerable: change since step 0",
                  "unanswerable: utility", "unanswerable: change since step 0"], table)
    last = evals[-1]
    for prefix, name in (("", "held-out"), ("answerable_", "answerable held-out"),
                         ("unanswerable_", "unanswerable held-out")):
        key = f"heldout_{prefix}retrieval_utility_change"
        if last.get(key + "_se", 0) > 0:
            change, se = last[key], last[key + "_se"]
            report.text(f"At the end the {name} retrieval utility changed by {change:+.4f} "
                        f"({change / se:+.1f} standard errors).")
    if control:
        report.text("The same held-out queries at the first and the last step, with the "
                    "retrieved candidates and with random blocks in their place (the null "
                    "document kept):")
        report.table(CONTROL_COLUMNS, control[0])
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
