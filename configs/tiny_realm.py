"""REALM at toy size: the whole code path on a CPU in seconds (used by the tests)."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "realm"
    c.seed = 0
    # The corpus (a block store from `realm-jax prepare-corpus`) and the HF folder of the
    # tokenizer it was made with; the trainer and the refresher both read them.
    # heldout_fraction: documents held out of training (0, 1/f, 2/f, ...: every 10th for
    # 0.1); the held-out evaluation's masked sentences come from them.
    c.data = ml_collections.ConfigDict(dict(corpus="", tokenizer="", heldout_fraction=0.1))
    # True: train only on queries whose masked span occurs in a block they may read (see
    # realm.AnswerFinder), for corpora too small for most spans to recur (at most 50M tokens).
    c.data.answerable_only = False
    c.model = ml_collections.ConfigDict()
    c.model.init_from_hf = ""
    # Per-part HF folders (REALM's embedder / knowledge-augmented encoder checkpoints);
    # each, when set, replaces what init_from_hf (or random init) gives that part.
    c.model.query_tower_hf = ""
    c.model.doc_tower_hf = ""
    c.model.reader_hf = ""
    c.model.encoder = ml_collections.ConfigDict(dict(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12,
        activation="gelu", dropout_rate=0.0, attention_dropout_rate=0.0, pad_token_id=0,
        add_pooler=True, dtype="float32", scan_layers=False, remat=False))
    c.model.retriever_proj_size = 16
    c.model.pooling = "pooler"
    c.retrieval = ml_collections.ConfigDict(dict(
        num_candidates=4, query_length=24, block_length=32, max_mask_tokens=10, mode="device",
        exclude="block", exclude_slack=16, score_scale=1.0, search_block_size=256,
        scann_threads=1))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.sharding_rules = None
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8, steps=4, learning_rate=1e-3, warmup_steps=1, decay="linear",
        # lr_multipliers: each part's learning rate (weight decay included) as a factor of
        # learning_rate; 0 freezes the part.
        lr_multipliers=dict(query_tower=1.0, doc_tower=1.0, reader=1.0),
        weight_decay=0.01, clip_norm=1.0, checkpoint_every=2, keep_checkpoints=3,
        async_checkpoints=True, log_every=1, index_wait_seconds=300,
        peak_flops_per_device=1e11,
        # Held-out evaluation (train/heldout.py): eval_queries masked sentences from the
        # held-out documents, scored at the start, every eval_every steps (0: never) and at
        # the end, eval_batch_size at a time. max_index_staleness: wait (up to
        # index_wait_seconds) for a newer index when the one in use is this many steps stale
        # and a newer checkpoint exists (0: never wait; the trainer and the refresher run
        # independently).
        eval_queries=16, eval_batch_size=8, eval_every=0, max_index_staleness=0))
    # fast_compile: cheap XLA compilation (CPU tests). allow_model_changes: model config
    # fields (e.g. "remat", "dtype") a resumed run may change without being refused.
    c.train.fast_compile = c.train.get("fast_compile", False)
    c.train.allow_model_changes = ()
    c.refresh = ml_collections.ConfigDict(dict(
        title="auto", max_length=0, batch_size=16, dtype="float16",
        shard_size=0, poll_seconds=1.0, keep_snapshots=2,
        scann=dict(brute_force_below=20_000, num_neighbors=10, num_threads=1)))
    return c
