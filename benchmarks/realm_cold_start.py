"""REALM's cold-start ablation at small scale: pre-training from ICT-warmed towers against
the same run from random towers.

Both arms start from the ICT run of benchmarks/ict_learning_curve.py (--ict_workdir): the
warm arm from its towers at --ict_step (default its last checkpoint), the cold arm from its
step-0 towers (the same architecture and random initialisation, untrained). Everything else
is the same: the ICT run's block store (the whole Wikipedia sample), a random reader of the
towers' sizes (same seed), REALM pre-training (`configs/realm.py:tiny` resized) with the
live query tower searching the index of the arm's initial document tower
(`retrieval.mode=device`; no refresher), the same batches and held-out documents (those ICT
never trained on, `data.heldout_fraction` 0.1). The trainer's held-out evaluation
(`realm_jax/tasks/heldout.py`) at step 0 and every --eval_every steps: the marginal MLM loss
of masked held-out sentences, the retrieval utility (that loss with the null document only,
minus the marginal), its change since step 0 with a standard error, and the answer recall
(the share of the answerable held-out queries, those whose masked span occurs in a block
they may read, with the answer in a retrieved candidate), and the retriever's mean
probability of the null document and of its top candidate. Collapse: at the start and the end
of each arm, the held-out queries searched by the arm's towers (corpus re-embedded by the
document tower): the number of distinct top-1 blocks, and the share of queries whose top-1
is the most frequent one.

    python benchmarks/ict_learning_curve.py --workdir ICT --steps 400 --eval_every 100 \
        --learning_rate 1e-3
    python benchmarks/realm_cold_start.py --ict_workdir ICT --ict_step 200 --out COLD \
        --steps 60 --eval_every 30 --eval_queries 160 --batch_size 8 --num_candidates 4

(docs/experiments.md; `--arms warm` and `--arms cold` run one arm each, e.g. in parallel,
and the command without it then reuses both and writes the report.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np
from common import Report, add_markdown_flag, minilm_folder, publish_initial_realm_index


def realm_config(ict_config: dict, towers: Path, args: argparse.Namespace):
    """REALM over the ICT run's store, towers from `towers`/{query,doc}, a random reader of
    the towers' encoder sizes."""
    from realm_jax import config as config_lib

    enc = ict_config["model"]["encoder"]
    return config_lib.load_config(
        "realm:tiny", f"data.corpus={ict_config['data']['corpus']}",
        f"data.tokenizer={minilm_folder()}",
        f"data.heldout_fraction={ict_config['data']['heldout_fraction']}",
        *(f"model.encoder.{k}={enc[k]}" for k in (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
            "max_position_embeddings")),
        f"model.query_tower_hf={towers / 'query'}", f"model.doc_tower_hf={towers / 'doc'}",
        f"retrieval.query_length={ict_config['ict']['query_length']}",
        f"retrieval.block_length={ict_config['ict']['context_length']}",
        f"retrieval.num_candidates={args.num_candidates}", "retrieval.mode=device",
        "retrieval.search_block_size=4096",
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.learning_rate={args.learning_rate}", f"train.warmup_steps={args.steps // 10}",
        f"train.checkpoint_every={args.steps}", "train.keep_checkpoints=2",
        "train.log_every=25", f"train.eval_every={args.eval_every}",
        f"train.lr_multipliers.query_tower={args.tower_lr}",
        f"train.lr_multipliers.doc_tower={args.tower_lr}",
        f"train.eval_queries={args.eval_queries}", "train.eval_batch_size=32",
        f"refresh.max_length={ict_config['ict']['context_length']}", "refresh.batch_size=128")


def export_towers(ict_workdir: Path, step: int, out: Path) -> Path:
    """The ICT run's towers at `step` as out/query and out/doc (a shared tower: both)."""
    from realm_jax.checkpoints import export_part
    from realm_jax.tasks.retriever import load_towers, query_part

    configs, _, _ = load_towers(ict_workdir, step)
    for part, name in ((query_part(configs), "query"), ("doc_tower", "doc")):
        if not (out / name).exists():
            export_part(ict_workdir, part, out / name, step=step, tokenizer=minilm_folder())
    return out


def top1_spread(config, workdir: Path, step: int) -> tuple[int, float, int]:
    """(distinct top-1 blocks, share of the most frequent one, queries) of the held-out
    queries, searched exactly by the checkpoint's query tower over the corpus embedded by
    its document tower."""
    from realm_jax.checkpoints import TrainCheckpoints
    from realm_jax.data.realm_examples import QueryMaker
    from realm_jax.data.store import BlockStore
    from realm_jax.tasks import heldout, realm
    from realm_jax.tasks.retriever import embed_corpus

    store = BlockStore.open(config.data.corpus)
    rc = config.retrieval
    maker = QueryMaker.for_store(store, minilm_folder(), query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    _, held = heldout.split_blocks(store, config.data.heldout_fraction)
    queries = heldout.heldout_queries(store, maker, held, config.train.eval_queries,
                                      config.seed)
    configs = realm.model_configs(config)
    with TrainCheckpoints(workdir) as checkpoints:
        q_params = checkpoints.restore_part(step, "query_tower")
        d_params = checkpoints.restore_part(step, "doc_tower")
    docs = embed_corpus(config, store, configs["doc_tower"], d_params)
    q_cfg = configs["query_tower"]
    ids = np.stack([q.input_ids for q in queries])
    mask = np.stack([q.attention_mask for q in queries])
    q = np.asarray(q_cfg.module().apply({"params": q_params}, ids, mask), np.float32)
    top = np.argmax(q @ docs.T, axis=1)
    counts = collections.Counter(top.tolist())
    return len(counts), counts.most_common(1)[0][1] / len(top), len(top)


def run_arm(name: str, towers: Path, ict_config: dict, root: Path, args) -> dict:
    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    config = realm_config(ict_config, towers, args)
    work = root / name
    done = work / "cold_start_arm.json"  # a finished arm's figures (a rerun reuses them)
    if done.exists():
        return dict(json.loads(done.read_text()), config=config)
    if not (work / "index").exists():
        publish_initial_realm_index(config, work / "index")
    started = time.perf_counter()
    trainer.train(config, work)
    minutes = (time.perf_counter() - started) / 60
    rows = read_metrics(work)
    evals = list({r["step"]: r for r in rows if "heldout_loss" in r}.values())
    losses = [r["loss"] for r in rows if "loss" in r]
    spread = {step: top1_spread(config, work, step) for step in (0, args.steps)}
    arm = dict(evals=evals, losses=losses, minutes=minutes, spread=spread)
    done.write_text(json.dumps(arm))
    return dict(json.loads(done.read_text()), config=config)


def change(r: dict, key: str) -> str:
    if key + "_change" not in r:
        return ""
    se = r.get(key + "_change_se", float("nan"))
    return f"{r[key + '_change']:+.4f}" + (f" ± {se:.4f}" if np.isfinite(se) else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ict_workdir", required=True,
                        help="the workdir of benchmarks/ict_learning_curve.py (its ict/ run)")
    parser.add_argument("--ict_step", type=int, default=None,
                        help="the warm arm's ICT checkpoint (default: the last)")
    parser.add_argument("--out", required=True, help="the two REALM runs go here")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--eval_queries", type=int, default=320)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_candidates", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--tower_lr", type=float, default=1.0,
                        help="the towers' learning rate as a factor of --learning_rate")
    parser.add_argument("--arms", default="warm,cold",
                        help="run only these arms (the report needs both: a later run with "
                             "both reuses a finished arm)")
    add_markdown_flag(parser)
    args = parser.parse_args()
    from realm_jax.checkpoints import TrainCheckpoints

    ict = Path(args.ict_workdir) / "ict"
    ict_config = json.loads((ict / "config.json").read_text())
    with TrainCheckpoints(ict) as checkpoints:
        warm_step = checkpoints.latest_step() if args.ict_step is None else args.ict_step
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    arms = {}
    for name, step in (("warm", warm_step), ("cold", 0)):
        if name in args.arms.split(","):
            towers = export_towers(ict, step, root / f"towers_{name}")
            arms[name] = run_arm(name, towers, ict_config, root, args)
    if len(arms) < 2:
        return
    load = os.getloadavg()

    first = arms["warm"]["evals"][0]
    cfg = arms["warm"]["config"]
    report = Report()
    report.text(
        f"REALM pre-training, {args.steps} steps of {args.batch_size} masked queries, "
        f"{args.num_candidates} candidates each (the null document included), the live query "
        f"tower searching the index of the arm's initial document tower, learning rate "
        f"{args.learning_rate:g} (towers x {args.tower_lr:g}) and a random reader "
        f"({cfg.model.encoder.num_layers} x {cfg.model.encoder.hidden_size}); warm: towers "
        f"of ICT step {warm_step}; cold: the same towers at ICT step 0. "
        f"{int(first['heldout_queries'])} held-out queries "
        f"({int(first['heldout_answerable_queries'])} answerable) from the documents neither "
        f"ICT nor REALM trained on. Minutes per arm: "
        f"{arms['warm']['minutes']:.1f} (warm), {arms['cold']['minutes']:.1f} (cold); load "
        f"average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end.")
    table = []
    for name, arm in arms.items():
        for r in arm["evals"]:
            table.append((name, r["step"], f"{r['heldout_loss']:.3f}",
                          f"{r['heldout_retrieval_utility']:+.4f}",
                          change(r, "heldout_retrieval_utility"),
                          f"{r['heldout_answerable_retrieval_utility']:+.4f}",
                          f"{r['heldout_answer_recall']:.3f}",
                          f"{r['heldout_null_prob']:.4f}",
                          f"{r['heldout_top_candidate_prob']:.4f}"))
    report.table(["towers", "step", "held-out MLM loss", "retrieval utility",
                  "utility change since step 0", "answerable: utility", "answer recall",
                  "p(null document)", "p(top candidate)"],
                 table, numeric_from=1)
    report.table(["towers", "step", "distinct top-1 blocks", "most frequent top-1's share",
                  "training loss (first / last logged)"],
                 [(name, step, f"{d} of {n}", f"{share:.3f}",
                   f"{arm['losses'][0 if step == 0 else -1]:.3f}")
                  for name, arm in arms.items()
                  for step, (d, share, n) in ((int(k), v) for k, v in arm["spread"].items())],
                 numeric_from=1)
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
