"""REALM pre-training at the paper's size: BERT-base towers and reader, 128-d retrieval
projections, k = 8 candidates of <= 288 wordpieces, queries of 96 wordpieces."""

import ml_collections


def bert_base() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
        activation="gelu", dropout_rate=0.1, attention_dropout_rate=0.1, pad_token_id=0,
        add_pooler=True, dtype="bfloat16", scan_layers=True, remat=True))


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
    c.model.init_from_hf = ""          # a local HF folder (e.g. a REALM or BERT checkpoint)
    # Per-part HF folders (REALM's embedder / knowledge-augmented encoder checkpoints);
    # each, when set, replaces what init_from_hf (or random init) gives that part.
    c.model.query_tower_hf = ""
    c.model.doc_tower_hf = ""
    c.model.reader_hf = ""
    c.model.encoder = bert_base()
    c.model.retriever_proj_size = 128
    c.model.pooling = "pooler"
    # mode: "scann" (queries embedded and searched on the host, in the input pipeline) or
    # "device" (exact search of the sharded embedding matrix inside the step).
    # exclude: the retrieved block a query may not read, "block" (the one its sentence came
    # from, as REALM) or "document" (every block of its source document); exclude_slack:
    # extra neighbours fetched so that dropping them still leaves num_candidates - 1.
    c.retrieval = ml_collections.ConfigDict(dict(
        num_candidates=8, query_length=96, block_length=288, max_mask_tokens=10, mode="scann",
        exclude="block", exclude_slack=16, score_scale=1.0, search_block_size=4096,
        scann_threads=0))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))   # (data, fsdp, tensor)
    c.sharding_rules = None                                      # None: realm_jax.sharding.DEFAULT_RULES
    c.train = ml_collections.ConfigDict(dict(
        batch_size=512, steps=200_000, learning_rate=3e-5, warmup_steps=10_000,
        # lr_multipliers: each part's learning rate (weight decay included) as a factor of
        # learning_rate; 0 freezes the part.
        lr_multipliers=dict(query_tower=1.0, doc_tower=1.0, reader=1.0),
        decay="linear", weight_decay=0.01, clip_norm=1.0, checkpoint_every=500,
        keep_checkpoints=3, async_checkpoints=True, log_every=10, index_wait_seconds=3600,
        peak_flops_per_device=197e12,  # bf16 peak of one TPU v5e chip
        # Held-out evaluation (train/heldout.py): eval_queries masked sentences from the
        # held-out documents, scored at the start, every eval_every steps (0: never) and at
        # the end, eval_batch_size at a time. max_index_staleness: wait (up to
        # index_wait_seconds) for a newer index when the one in use is this many steps stale
        # and a newer checkpoint exists (0: never wait; the trainer and the refresher run
        # independently).
        eval_queries=32, eval_batch_size=64, eval_every=1000, max_index_staleness=0))
    # fast_compile: cheap XLA compilation (CPU tests). allow_model_changes: model config
    # fields (e.g. "remat", "dtype") a resumed run may change without being refused.
    c.train.fast_compile = c.train.get("fast_compile", False)
    c.train.allow_model_changes = ()
    # The refresher (realm-jax refresh): see realm_jax.refresh.RefreshSettings.
    c.refresh = ml_collections.ConfigDict(dict(
        title="auto",         # auto: titles for DPR passages; yes / no
        max_length=0,         # 0: the tower's max_position_embeddings
        batch_size=256, dtype="float16", shard_size=1_000_000, poll_seconds=30.0,
        keep_snapshots=3,
        scann=dict(brute_force_below=20_000, num_neighbors=10, reorder=100, num_threads=0)))
    return c
