"""REALM pre-training step throughput on this machine, through the real trainer
(`realm_jax.train.trainer.train`: grain pipeline, jitted sharded step, checkpoints), for two
model sizes and both retrieval modes, and the share of a step spent on retrieval.

  - tiny: configs/realm.py:tiny (2 layers, 32 wide) with the MiniLM vocabulary;
  - MiniLM: configs/realm.py:demo (all-MiniLM-L6-v2 towers and reader).

Corpus: REALM blocks of the Wikipedia sample shipped in gensim; the index is published once
from the initial document tower (no refresher, so every step sees the same index).

Retrieval share:
  - device mode: the in-step retrieval (query tower, exact search of the sharded corpus,
    candidate gather) jitted on its own, seconds per call / seconds per step;
  - scann mode: the host retriever of the input pipeline (query tower of the snapshot's
    checkpoint, ScaNN search, candidate tokens), seconds per batch / seconds per step. The
    trainer prepares the next batch during the step, so this time is hidden while it stays
    below the step time.

    python benchmarks/bench_realm_step.py [--steps 12 --articles 20 --sizes tiny,minilm]

No peer: there is no maintained PyTorch REALM pre-training implementation to run beside it
(transformers' REALM is inference and fine-tuning only, in maintenance mode).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax
from common import (Report, add_markdown_flag, matmul_peak_flops, median_seconds, minilm_folder,
                    publish_initial_realm_index, wiki_sample_path)

SIZES = {"tiny": ("realm:tiny", ["model.encoder.vocab_size=30522"]),
         "minilm": ("realm:demo", [])}


def _config(size: str, corpus: Path, model: str, mode: str, steps: int, batch: int | None,
            peak_flops: float = 1e11):
    from realm_jax import config as config_lib

    name, extra = SIZES[size]
    overrides = [f"data.corpus={corpus}", f"data.tokenizer={model}", f"retrieval.mode={mode}",
                 f"train.steps={steps}", "train.log_every=1", f"train.checkpoint_every={steps}",
                 "train.eval_queries=0", "train.async_checkpoints=False",
                 f"train.peak_flops_per_device={peak_flops}", *extra]
    if size == "minilm":
        overrides.append(f"model.init_from_hf={model}")
    if batch:
        overrides.append(f"train.batch_size={batch}")
    return config_lib.load_config(name, *overrides)


def _retrieval_seconds(config, result, model: str, repeats: int) -> float:
    """Seconds per batch of the retrieval alone, in the run's mode, on a real batch."""
    from realm_jax import sharding
    from realm_jax.data.realm_examples import QueryMaker, collate_queries
    from realm_jax.data.store import BlockStore
    from realm_jax.tasks import realm

    rc = config.retrieval
    store = BlockStore.open(config.data.corpus)
    maker = QueryMaker.for_store(store, model, query_length=rc.query_length,
                                 max_mask_tokens=rc.max_mask_tokens)
    queries = [q for q in maker.iter_store(store)][:config.train.batch_size]
    batch = collate_queries(queries)
    params = result["final_state"].params
    configs, snapshot = result["configs"], result["snapshot"]
    if rc.mode == "scann":
        retriever = realm.HostRetriever.from_config(rc, snapshot, configs["query_tower"],
                                                    jax.device_get(params["query_tower"]), store)
        return median_seconds(lambda: retriever(batch)["cand_tokens"], repeats)
    mesh = sharding.mesh_from_config(config)
    loss_fn = realm.RealmLossFn.from_config(rc, configs, maker.special, num_valid=len(store))
    with sharding.activate(mesh, sharding.rules_from_config(config)):
        corpus = realm.device_corpus(snapshot, store, rc.block_length, mesh, loss_fn.block_size)
        fields = {k: batch[k] for k in realm.QUERY_FIELDS}
        search = jax.jit(loss_fn.device_candidates)
        return median_seconds(lambda: search(params, fields, corpus.arrays())["cand_tokens"],
                               repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run (+2 warm-up)")
    parser.add_argument("--articles", type=int, default=20, help="articles of the sample")
    parser.add_argument("--sizes", default="tiny,minilm")
    parser.add_argument("--modes", default="device,scann")
    parser.add_argument("--batch", type=int, default=0, help="override train.batch_size")
    parser.add_argument("--model", default=None, help="HF folder (default: installed MiniLM)")
    add_markdown_flag(parser)
    args = parser.parse_args()

    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    args.model = minilm_folder(args.model)
    peak = matmul_peak_flops()
    root = Path(tempfile.mkdtemp(prefix="bench_realm_"))
    rows = []
    for size in args.sizes.split(","):
        block_length = _config(size, root, args.model, "device", 1, None).retrieval.block_length
        corpus = root / f"corpus_{block_length}"
        if not corpus.exists():
            prepare_corpus(wiki_sample_path(), corpus, tokenizer=args.model, mode="realm",
                           max_tokens=block_length, max_documents=args.articles, progress=False)
        for mode in args.modes.split(","):
            config = _config(size, corpus, args.model, mode, args.steps + 2, args.batch or None,
                             peak)
            workdir = root / f"{size}_{mode}"
            publish_initial_realm_index(config, workdir / "index")
            result = trainer.train(config, workdir)
            logged = [r for r in read_metrics(workdir) if "loss" in r][2:]
            step = statistics.median(r["step_time"] for r in logged)
            mfu = statistics.median(r["mfu"] for r in logged)
            tc, rc = config.train, config.retrieval
            tokens = tc.batch_size * rc.num_candidates * (rc.query_length + rc.block_length)
            retrieval = _retrieval_seconds(config, result, args.model, repeats=5)
            rows.append((size, mode, f"{tc.batch_size} x {rc.num_candidates}", f"{step:.3f}",
                         f"{tc.batch_size / step:.2f}", f"{tokens / step:,.0f}",
                         f"{mfu * peak * jax.device_count() / 1e9:.1f}", f"{mfu:.0%}",
                         f"{retrieval / step:.0%}"))
            print(f"{size}/{mode}: {step:.3f} s/step, retrieval {retrieval:.3f} s", flush=True)

    report = Report()
    report.text(f"JAX on {jax.device_count()} x {jax.devices()[0].platform}; {args.articles} "
                f"articles; median of {args.steps} steps after 2 warm-up steps; utilization "
                f"against the measured float32 matmul peak of {peak / 1e9:.0f} GFLOP/s per "
                f"device.")
    report.table(["model", "mode", "batch x candidates", "s/step", "examples/s",
                  "reader tokens/s", "model GFLOP/s", "utilization", "retrieval / step"],
                 rows, numeric_from=2)
    report.emit(args.markdown)

if __name__ == "__main__":
    main()
