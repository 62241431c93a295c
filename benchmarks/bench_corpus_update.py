"""The cost of a knowledge update: changing 1% of a corpus's blocks with `corpus update` and
refreshing the index incrementally, against a full refresh of the same (updated) corpus.

The corpus: the Wikipedia sample shipped in gensim, its first articles cut into 100-word
DPR passages, each passage a document of its own (so a changed document is a changed
block); both towers all-MiniLM-L6-v2 (configs/retrieval.py). In one process:

  1. a full refresh of version 0 (compiles the embedder, which all refreshes share as the
     long-running refresher does: not timed against);
  2. `update_corpus` replaces `--fraction` of the documents with edited text (version 1);
  3. `refresh --once` in the same workdir: the same tower, so only the new blocks are
     embedded (in a batch fitted to them, a shape the embedder compiles the first time)
     and the rest reused from the snapshot of version 0;
  4. another `--fraction` of the documents replaced (version 2) and refreshed the same way,
     the small batch shape now compiled, as in a long-running refresher;
  5. `refresh --once` in a fresh workdir: every block of version 2 embedded (timed on its
     second run, its batch shapes compiled by the first).

Steps 1-4 use one `Refresher`, which follows the store's versions as the long-running
refresher does.

    python benchmarks/bench_corpus_update.py [--articles 5 --fraction 0.01 --batch_size 32]

Prints a markdown table: seconds of each stage (restore, embed, ScaNN build, publish), the
blocks embedded and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from common import Report, add_markdown_flag, minilm_folder, wiki_sample_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--articles", type=int, default=5,
                        help="articles of the Wikipedia sample (it has 106)")
    parser.add_argument("--fraction", type=float, default=0.01,
                        help="fraction of the documents (= blocks) the update replaces")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="refresh.batch_size: rows per embedding batch (an incremental "
                             "refresh embeds at least one padded batch per length bucket)")
    parser.add_argument("--model", default=None, help="HF folder (default: installed MiniLM)")
    parser.add_argument("--workdir", default=None, help="where stores and workdirs go")
    parser.add_argument("--cpu_devices", type=int, default=0,
                        help="as `realm-jax refresh --cpu_devices` (0: one per core)")
    add_markdown_flag(parser)
    args = parser.parse_args()
    from realm_jax import sharding
    sharding.use_cpu_devices(args.cpu_devices)

    from realm_jax import config as config_lib
    from realm_jax import refresh
    from realm_jax.data import BlockStore, prepare_corpus
    from realm_jax.data.corpus import update_corpus
    from realm_jax.index.embed_corpus import CorpusEmbedder

    folder = minilm_folder(args.model)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_update_"))
    started = time.perf_counter()
    passages = prepare_corpus(wiki_sample_path(), work / "articles", tokenizer=folder,
                              mode="dpr", max_documents=args.articles, overwrite=True,
                              progress=False)
    docs = []
    with BlockStore.open(passages.path) as s:
        for i in range(len(s)):
            docs.append({"id": f"{s.doc_id(i)}#{i}", "title": s.title(i), "text": s.text(i)})
    source = work / "passages.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    store = prepare_corpus(source, work / "store", tokenizer=folder, mode="dpr",
                           overwrite=True, progress=False).path
    config = config_lib.load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "retrieval.py"),
        f"data.corpus={store}", f"data.tokenizer={folder}", f"model.doc_tower_hf={folder}",
        f"model.query_tower_hf={folder}", f"refresh.batch_size={args.batch_size}")
    settings = refresh.RefreshSettings.from_config(config)
    embedders = {}

    def shared_embedder(tower):  # one compiled embedder for all refreshes, as in one refresher
        if tower not in embedders:
            embedders[tower] = CorpusEmbedder(tower, batch_size=settings.batch_size,
                                              dtype=settings.dtype)
        return embedders[tower]

    def refresher(workdir: Path):
        return refresh.Refresher(workdir, settings, from_hf=folder, progress=False,
                                 embedder_factory=shared_embedder)

    def refresh_once(workdir: Path):
        [result] = refresher(workdir).run(once=True)
        return result

    follower = refresher(work / "w_incremental")  # the long-running refresher
    first = follower.refresh_once()
    rng = random.Random(0)
    count = max(1, round(args.fraction * len(docs)))
    picked = rng.sample(docs, 2 * count)

    def update_and_refresh(changed: list[dict], word: str):
        edits = work / "edits.jsonl"
        edits.write_text("".join(json.dumps(dict(d, text=f"{word} " + d["text"].split(" ", 1)[-1]))
                                 + "\n" for d in changed))  # the same length: still one block
        t0 = time.perf_counter()
        update = update_corpus(store, add=edits)
        return update, time.perf_counter() - t0, follower.refresh_once()

    update, update_seconds, incremental = update_and_refresh(picked[:count], "Revised")
    _, update2_seconds, incremental2 = update_and_refresh(picked[count:], "Amended")
    changed = picked[:count]
    refresh_once(work / "w_full_warmup")  # compiles the shapes of version 2's full refresh
    full = refresh_once(work / "w_full")
    with BlockStore.open(store) as v2:
        live = int(v2.live.sum())

    report = Report()
    report.text(f"{len(docs)} passages of the first {args.articles} articles, each its own "
                f"document; the update replaces {len(changed)} of them "
                f"({100 * len(changed) / len(docs):.1f}% of the blocks), a second one "
                f"{len(changed)} others (version 2 has {live} "
                f"live blocks); all-MiniLM-L6-v2 embeds (float16, batches of "
                f"{settings.batch_size}, one compiled embedder shared by all refreshes), ScaNN "
                f"({config.refresh.scann.brute_force_below} brute-force threshold); the first "
                f"full refresh of version 0 (compiling) took {first.seconds:.1f}s.")
    rows = []
    for name, r in (("full refresh of version 2 (fresh workdir)", full),
                    ("incremental refresh after update 1 (compiles the small batch)",
                     incremental),
                    ("incremental refresh after update 2 (compiled)", incremental2)):
        rows.append((name, f"{r.seconds:.2f}", f"{r.restore_seconds:.2f}",
                     f"{r.embed_seconds:.2f}", f"{r.build_seconds:.2f}",
                     f"{r.publish_seconds:.2f}", r.embedded, r.reused))
    rows.append(("`corpus update` itself (update 1 / update 2)",
                 f"{update_seconds:.2f} / {update2_seconds:.2f}", "", "", "", "",
                 update.blocks["replaced_new"], ""))
    report.table(("", "total s", "restore s", "embed s", "build s", "publish s",
                  "blocks embedded", "blocks reused"), rows)
    parts = []
    for name, r, u in (("update 1", incremental, update_seconds),
                       ("update 2", incremental2, update2_seconds)):
        share = 100 * (r.seconds + u) / full.seconds
        parts.append(f"{name} + its incremental refresh: {share:.1f}%"
                     f" of a full refresh's time ({full.seconds / (r.seconds + u):.1f}x faster),"
                     f" its embedding stage {100 * r.embed_seconds / full.embed_seconds:.1f}% of"
                     f" the full one's, for {100 * r.embedded / full.embedded:.1f}% of the blocks")
    report.text("; ".join(parts) + f". Total run {time.perf_counter() - started:.0f}s.")
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
