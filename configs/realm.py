"""REALM pre-training at the paper's size: BERT-base towers and reader, 128-d retrieval
projections, k = 8 candidates of <= 288 wordpieces, queries of 96 wordpieces.

    realm-jax train   --config configs/realm.py --workdir W --config.data.corpus=blocks \
        --config.data.tokenizer=BERT
    realm-jax refresh --config configs/realm.py --workdir W    # beside it: keeps the index fresh

Variants (`--config configs/realm.py:ARG`):
  tiny: toy sizes, the whole code path on a CPU in seconds (the tests);
  demo: `realm-jax demo`'s run (which fills in the paths): all-MiniLM-L6-v2 towers and
    reader (the reader's MLM head newly initialised) on the Wikipedia sample shipped in
    gensim, sized for a 2-core CPU in about ten minutes: shorter blocks and queries, fewer
    candidates and smaller batches than the paper's 288 / 96 / 8 / 512.
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, demo=False)
    if arg.tiny and arg.demo:
        raise ValueError("configs/realm.py: `tiny` and `demo` are two sizes; pick one")
    c = common.experiment("realm")
    c.data = common.data(
        # Documents held out of training (0, 1/f, 2/f, ...: every 10th for 0.1); the held-out
        # evaluation's masked sentences come from them.
        heldout_fraction=0.1,
        # True: train only on queries whose masked span occurs in a block they may read (see
        # realm.AnswerFinder), for corpora too small for most spans to recur (<= 50M tokens).
        answerable_only=False)
    c.model = common.bert_model(
        common.bert_base(),
        # The document tower's own HF folder (a REALM embedder), as query_tower_hf.
        doc_tower_hf="")
    c.retrieval = common.retrieval(
        # Candidates per query (the null document, always candidate 0, included); the most
        # wordpieces masked in a query (one salient span).
        num_candidates=8, max_mask_tokens=10, mode="scann",
        # The retrieved blocks a query may not read: "block" (the one its sentence came
        # from, as REALM) or "document" (every block of its source document); exclude_slack:
        # extra neighbours fetched so that dropping them still leaves num_candidates - 1.
        exclude="block", exclude_slack=16, **common.scann_threads(0))
    c.train = common.train(
        batch_size=512, steps=200_000, learning_rate=3e-5, warmup_steps=10_000,
        checkpoint_every=500, log_every=10,
        **common.lr_multipliers(query_tower=1.0, doc_tower=1.0, reader=1.0),
        **common.index_wait(3600),
        # Held-out evaluation (train/heldout.py): eval_queries masked sentences from the
        # held-out documents, scored at the start, every eval_every steps (0: never) and at
        # the end, eval_batch_size at a time.
        eval_queries=32, eval_batch_size=64, eval_every=1000,
        # Wait (up to index_wait_seconds) for a newer index when the one in use is this many
        # steps stale and a newer checkpoint exists (0: never wait; the trainer and the
        # refresher run independently).
        max_index_staleness=0)
    c.refresh = common.refresh()

    if arg.tiny:
        c.model.encoder = common.tiny_encoder()
        c.model.retriever_proj_size = 16
        c.retrieval.update(common.TINY_RETRIEVAL, num_candidates=4, mode="device",
                           scann_threads=1)
        c.train.update(common.TINY_TRAIN, index_wait_seconds=300, eval_queries=16,
                       eval_batch_size=8, eval_every=0)
        c.refresh = common.refresh(tiny=True)
    if arg.demo:
        c.model.encoder = common.ConfigDict(common.run_knobs(cpu=True))  # sizes: MiniLM's
        c.model.retriever_proj_size = 0
        # MiniLM's embeddings are unit vectors: score_scale 20 turns cosines into logits.
        c.retrieval.update(num_candidates=3, query_length=48, block_length=96,
                           exclude_slack=24, score_scale=20.0, search_block_size=1024,
                           scann_threads=1)
        c.train.update(
            batch_size=2, steps=120, learning_rate=1e-4, warmup_steps=10, checkpoint_every=30,
            keep_checkpoints=4, log_every=5, peak_flops_per_device=1e11,
            index_wait_seconds=900, eval_every=0,
            # The towers start as a trained retriever, the reader's MLM head from nothing: at
            # the full rate the query tower drifted to the same few blocks for every query
            # within a few hundred steps (see benchmarks/realm_heldout.py).
            lr_multipliers=dict(query_tower=0.1, doc_tower=0.1, reader=1.0))
        c.refresh = common.refresh(tiny=True, poll_seconds=2.0, keep_snapshots=3)
    return c
