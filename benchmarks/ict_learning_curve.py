"""ICT from random towers on the Wikipedia sample: held-out recall@k along training.

The whole gensim Wikipedia sample cut into REALM blocks of at most --block_length
wordpieces (MiniLM's tokenizer); small random BERT towers with MiniLM's vocabulary
(--layers x --hidden, --pooling, --projection; by default one mean-pooled tower shared by
queries and blocks, --no-shared_towers for ORQA's two) trained by the real trainer on
ICT (`configs/ict.py`, the sentence removed from its block with probability 0.9) over the
blocks of the training documents. At step 0 (the untrained towers) and every --eval_every
steps, `realm-jax eval`'s evaluation (`RetrieverAnswerer.evaluate`): one pseudo-query
sentence from each block of the held-out documents (`data.heldout_fraction`, never trained
on), searched exactly among all blocks of the corpus (the held-out ones included), a hit
being the block it was taken from; chance is k / blocks.

    python benchmarks/ict_learning_curve.py --workdir ICT --steps 400 --eval_every 100 \
        --learning_rate 1e-3

With --workdir the store and the run are kept there (benchmarks/realm_cold_start.py, the
REALM cold-start ablation, starts REALM from that run's towers); the same command again
resumes or, when the run is finished, only evaluates (--stop_after N stops training at N).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import Report, add_markdown_flag, minilm_folder, wiki_sample_path


def ict_config(root: Path, args: argparse.Namespace):
    """The ICT config of this experiment over root/store (see the module docstring)."""
    from realm_jax import config as config_lib

    return config_lib.load_config(
        "ict:tiny", f"data.corpus={root / 'store'}", f"data.tokenizer={minilm_folder()}",
        "data.heldout_fraction=0.1",
        f"model.encoder.hidden_size={args.hidden}", f"model.encoder.num_layers={args.layers}",
        f"model.encoder.num_heads={args.hidden // 32}",
        f"model.encoder.intermediate_size={4 * args.hidden}",
        "model.encoder.max_position_embeddings=128",
        f"model.retriever_proj_size={args.projection}",
        f"model.pooling={args.pooling}", f"model.shared_towers={args.shared_towers}",
        f"ict.query_length={args.query_length}", f"ict.context_length={args.block_length}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.learning_rate={args.learning_rate}", f"train.warmup_steps={args.steps // 10}",
        f"train.checkpoint_every={args.eval_every}",
        f"train.keep_checkpoints={args.steps // args.eval_every + 2}",
        "train.log_every=50", "eval.batch_size=128", "eval.recall_at=(1,5,20,100)",
        f"refresh.max_length={args.block_length}", "refresh.batch_size=128")


def prepare_store(root: Path, block_length: int) -> None:
    from realm_jax.data.corpus import prepare_corpus

    if not (root / "store").exists():
        prepare_corpus(wiki_sample_path(), root / "store", tokenizer=minilm_folder(),
                       mode="realm", max_tokens=block_length, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="",
                        help="keep the store and the run here (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval_every", type=int, default=300)
    parser.add_argument("--stop_after", type=int, default=None,
                        help="stop training at this step (the schedule still runs to --steps)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--query_length", type=int, default=32)
    parser.add_argument("--block_length", type=int, default=64)
    parser.add_argument("--pooling", choices=("pooler", "cls", "mean"), default="mean")
    parser.add_argument("--projection", type=int, default=0,
                        help="projection size (REALM: 128; 0: none, the hidden size; a "
                             "mean-pooled tower with one has no HF layout for REALM's init)")
    parser.add_argument("--shared_towers", action=argparse.BooleanOptionalAction,
                        default=True, help="one tower for queries and blocks")
    add_markdown_flag(parser)
    args = parser.parse_args()
    from realm_jax.checkpoints import TrainCheckpoints
    from realm_jax.tasks.retriever import RetrieverAnswerer
    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    root = Path(args.workdir or tempfile.mkdtemp(prefix="ict_curve_"))
    root.mkdir(parents=True, exist_ok=True)
    prepare_store(root, args.block_length)
    config = ict_config(root, args)
    started = time.perf_counter()
    trainer.train(config, root / "ict", stop_after=args.stop_after)
    minutes = (time.perf_counter() - started) / 60
    load = os.getloadavg()
    with TrainCheckpoints(root / "ict") as checkpoints:
        steps = checkpoints.all_steps()
    rows = []
    for step in steps:
        answerer = RetrieverAnswerer(config, root / "ict", step=step)
        metrics, _ = answerer.evaluate(out=str(root / f"eval_step{step}.jsonl"))
        rows.append(metrics)
        print(step, {k: v for k, v in metrics.items() if k.startswith("recall")}, flush=True)
    losses = {r["step"]: r for r in read_metrics(root / "ict") if "loss" in r}

    def train_at(step):
        near = [s for s in losses if s <= step and step - s < 50]
        return f"{losses[max(near)]['loss']:.3f}" if near else ""

    blocks = rows[0]["corpus_blocks"]
    report = Report()
    report.text(
        f"ICT from random towers ({'one shared tower' if args.shared_towers else 'two towers'}"
        f", {args.layers} layers x {args.hidden}, MiniLM's vocabulary, {args.pooling} pooling"
        f"{f', {args.projection}-d projection' if args.projection else ''}): "
        f"{steps[-1]} steps (of a {config.train.steps}-step "
        f"schedule) of {args.batch_size} "
        f"pseudo-queries (in-batch negatives), learning rate {args.learning_rate:g}, queries "
        f"of {args.query_length} and blocks of {args.block_length} wordpieces; "
        f"{minutes:.1f} min of training in this sitting (load average {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f} at the end). Held-out: {rows[0]['count']} "
        f"pseudo-queries, one from each block of the 10% of documents not trained on, "
        f"searched among all {blocks} blocks; chance recall@1 / @20 = "
        f"{100 / blocks:.3f}% / {2000 / blocks:.2f}%.")
    report.table(["step", "training loss (logged)", "R@1", "R@5", "R@20", "R@100"],
                 [(r["step"], train_at(r["step"]),
                   *(f"{100 * r[f'recall@{k}']:.1f}" for k in (1, 5, 20, 100)))
                  for r in rows])
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
