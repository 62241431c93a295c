"""Open-QA (ORQA / REALM open-QA) on this machine: the fine-tuning step through the real
trainer (s/step, examples/s, reader tokens/s, model FLOP/s), and evaluation throughput,
questions/s end to end through `realm_jax.tasks.orqa.Predictor` (tokenize, embed, search, read, best span,
span text), and the split of the time between embedding the questions, searching the
frozen index on the devices, reading the top-k blocks, and the host's own work.

Setup: configs/orqa.py:tiny with all-MiniLM-L6-v2 as query tower and reader encoder, the
frozen index built by the refresher from the same weights (`refresh --once --from_hf`) over
REALM blocks of the Wikipedia sample shipped in gensim, cloze questions made from the
corpus. Throughput does not depend on training: evaluation uses the initial weights.

    python benchmarks/bench_qa_eval.py [--questions 64 --batch 16 --num_read 5 --articles 40
                                        --train_steps 6]

No peer: transformers' REALM open-QA model (the only PyTorch one) answers one question per
call and is in maintenance mode.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax
from common import (Report, add_markdown_flag, matmul_peak_flops, median_seconds, minilm_folder,
                    wiki_sample_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="questions per jitted batch")
    parser.add_argument("--num_read", type=int, default=5, help="blocks read per question")
    parser.add_argument("--articles", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train_steps", type=int, default=6,
                        help="ORQA fine-tuning steps timed (after 2 warm-up steps; 0: none)")
    parser.add_argument("--model", default=None, help="HF folder (default: installed MiniLM)")
    add_markdown_flag(parser)
    args = parser.parse_args()

    from realm_jax import config as config_lib
    from realm_jax import refresh, sharding
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.data.qa import questions_from_store
    from realm_jax.tasks import orqa
    from realm_jax.tasks.end_to_end import question_batch
    from realm_jax.tasks.orqa import Predictor, Setup
    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    args.model = minilm_folder(args.model)
    root = Path(tempfile.mkdtemp(prefix="bench_qa_"))
    prepare_corpus(wiki_sample_path(), root / "corpus", tokenizer=args.model, mode="realm",
                   max_tokens=128, max_documents=args.articles, progress=False)
    overrides = [f"data.corpus={root / 'corpus'}", f"data.tokenizer={args.model}",
                 f"model.init_from_hf={args.model}", "retrieval.query_length=32",
                 "retrieval.block_length=128", f"retrieval.num_read={args.num_read}",
                 "retrieval.score_scale=20.0", f"eval.batch_size={args.batch}"]
    config = config_lib.load_config("orqa:tiny", *overrides)
    workdir = root / "run"
    refresh.main(config, workdir, once=True, from_hf=args.model, progress=False)
    report = Report()

    if args.train_steps:
        # The fine-tuning step, through the real trainer, on cloze questions of the corpus.
        peak, steps = matmul_peak_flops(), args.train_steps + 2
        train_config = config_lib.load_config(
            "orqa:tiny", *overrides, f"train.steps={steps}", f"train.batch_size={args.batch}",
            "train.log_every=1", f"train.checkpoint_every={steps}", "train.eval_questions=0",
            "train.async_checkpoints=False", f"train.peak_flops_per_device={peak}")
        trainer.train(train_config, workdir)
        logged = [r for r in read_metrics(workdir) if "loss" in r][2:]
        step = statistics.median(r["step_time"] for r in logged)
        host = statistics.median(r["host_time"] for r in logged)
        mfu = statistics.median(r["mfu"] for r in logged)
        rc = train_config.retrieval
        tokens = args.batch * rc.num_read * (rc.query_length + rc.block_length)
        report.text(f"ORQA fine-tuning step (`realm-jax train`, task orqa): batch {args.batch}, "
                    f"beam {rc.beam_size}, top {rc.num_read} read; median of {args.train_steps} "
                    f"steps after 2 warm-up steps; utilization against the measured float32 "
                    f"matmul peak of {peak / 1e9:.0f} GFLOP/s per device.")
        report.table(["s/step (device)", "host s/step (batch, beam search)", "examples/s",
                      "reader tokens/s", "model GFLOP/s", "utilization"],
                     [(f"{step:.3f}", f"{host:.3f}", f"{args.batch / (step + host):.2f}",
                       f"{tokens / step:,.0f}",
                       f"{mfu * peak * jax.device_count() / 1e9:.1f}", f"{mfu:.0%}")],
                     numeric_from=0)

    configs, host_params = orqa.build_models(config)
    setup = Setup.create(config, workdir, configs)
    shardings = sharding.part_shardings(configs, setup.mesh, setup.rules)
    params = sharding.place(host_params, shardings)
    predictor = Predictor(setup, shardings, params)
    examples = questions_from_store(setup.store, setup.tokenizer, num=args.questions, seed=0)
    questions = [ex.question for ex in examples]

    # End to end, as `realm-jax eval` answers them.
    end_to_end = median_seconds(lambda: predictor(questions), args.repeats)

    # The device parts on one batch, each jitted alone.
    model, corpus = setup.model, setup.corpus.arrays()
    batch = question_batch(setup.encode(questions[:predictor.batch_size]),
                           predictor.batch_sharding)
    with sharding.activate(setup.mesh, setup.rules):
        embed = jax.jit(model.embed)
        search = jax.jit(lambda q, c: model.top_rows(q, c, model.num_read))
        read = jax.jit(lambda p, b, c, r: model.read(p, b, c, r)[0])
        q = embed(params, batch)
        rows = search(q, corpus)
        r = args.repeats
        per_batch = {
            "embed the questions (query tower)": median_seconds(lambda: embed(params, batch), r),
            "search the frozen index (exact, on the devices)":
                median_seconds(lambda: search(q, corpus), r),
            f"read the top {model.num_read} blocks (span reader, best span)":
                median_seconds(lambda: read(params, batch, corpus, rows), r)}
    batches = -(-len(questions) // predictor.batch_size)
    split = {k: v * batches for k, v in per_batch.items()}
    split["host: tokenize, span text, bookkeeping"] = max(0.0, end_to_end - sum(split.values()))

    report.text(f"Evaluation: JAX on {jax.device_count()} x {jax.devices()[0].platform}; the frozen index of "
                f"{len(setup.store)} blocks of {args.articles} articles; {len(questions)} "
                f"questions in batches of {predictor.batch_size}; the top {model.num_read} "
                f"blocks read ({config.retrieval.query_length}+{config.retrieval.block_length} "
                f"tokens each).")
    report.text(f"End to end: **{len(questions) / end_to_end:.1f} questions/s**.")
    report.table(["part", f"seconds ({len(questions)} questions)", "share"],
                 [(name, f"{seconds:.3f}", f"{seconds / end_to_end:.0%}")
                  for name, seconds in split.items()])
    report.emit(args.markdown)

if __name__ == "__main__":
    main()
