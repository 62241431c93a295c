"""ORQA / REALM open-QA fine-tuning at toy size: the whole code path on a CPU in seconds
(used by the tests). Questions default to cloze questions made from the corpus.

    realm-jax refresh --config configs/tiny_orqa.py --workdir W --once --from_hf DOC_TOWER
    realm-jax train --config configs/tiny_orqa.py --workdir W
    realm-jax eval --config configs/tiny_orqa.py --workdir W
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "orqa"
    c.seed = 0
    # corpus/tokenizer: the block store and its HF tokenizer folder (as for REALM). train /
    # eval: a QA file (.jsonl/.json/.tsv), a TFDS dataset (tfds:natural_questions_open, read
    # from data_dir), or "cloze" (cloze_questions questions made from the corpus; the same
    # split name gives the same questions).
    c.data = ml_collections.ConfigDict(dict(
        corpus="", tokenizer="", train="cloze", train_split="train", eval="cloze",
        eval_split="validation", data_dir="", cloze_questions=32))
    c.model = ml_collections.ConfigDict()
    # Where the weights come from (a later one replaces an earlier one's part):
    # init_from_realm: a REALM pre-training workdir (query tower; reader encoder), its
    # checkpoint realm_step (-1: the newest); init_from_hf: one BERT-layout folder for both;
    # query_tower_hf / reader_hf: per part (REALM embedder / RealmReader, DPR, BERT).
    c.model.init_from_realm = ""
    c.model.realm_step = -1
    c.model.init_from_hf = ""
    c.model.query_tower_hf = ""
    c.model.reader_hf = ""
    c.model.encoder = ml_collections.ConfigDict(dict(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12,
        activation="gelu", dropout_rate=0.0, attention_dropout_rate=0.0, pad_token_id=0,
        add_pooler=True, dtype="float32", scan_layers=False, remat=False))
    c.model.retriever_proj_size = 16
    c.model.pooling = "pooler"
    c.model.span_hidden_size = 32
    c.model.max_span_width = 10
    # index: the frozen IndexStore root ("": WORKDIR/index); beam_size: retriever beam for
    # the retrieval loss; num_read: top blocks read by the span reader; reader_length: of
    # `[CLS] question [SEP] block [SEP]`, the block cut to fit (0: query + block length).
    c.retrieval = ml_collections.ConfigDict(dict(
        index="", mode="device", beam_size=8, num_read=3, query_length=24, block_length=32,
        reader_length=0, score_scale=1.0, search_block_size=256))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.sharding_rules = None
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8, steps=4, learning_rate=1e-3, warmup_steps=1, decay="linear",
        # lr_multipliers: each part's learning rate (weight decay included) as a factor of
        # learning_rate; 0 freezes the part.
        lr_multipliers=dict(query_tower=1.0, reader=1.0),
        weight_decay=0.01, clip_norm=1.0, checkpoint_every=2, keep_checkpoints=3,
        async_checkpoints=True, log_every=1, peak_flops_per_device=1e11,
        # Evaluation while training: the first eval_questions of data.eval (0: none), at
        # the start, every eval_every steps (0: never) and at the end.
        eval_questions=16, eval_every=0,
        # Cheap XLA compilation (CPU tests: compiling the step takes longer than running it).
        fast_compile=False))
    # fast_compile: cheap XLA compilation (CPU tests). allow_model_changes: model config
    # fields (e.g. "remat", "dtype") a resumed run may change without being refused.
    c.train.fast_compile = c.train.get("fast_compile", False)
    c.train.allow_model_changes = ()
    # `realm-jax eval` (and the evaluation while training): num_questions of data.eval
    # (0: all), questions per jitted batch, recall@k for k in recall_at.
    c.eval = ml_collections.ConfigDict(dict(num_questions=0, batch_size=8, recall_at=(1, 3)))
    # `realm-jax refresh --once --from_hf`: the frozen index from pretrained weights (no
    # ScaNN: ORQA searches the embeddings on the devices).
    c.refresh = ml_collections.ConfigDict(dict(
        title="auto", max_length=0, batch_size=16, dtype="float16", shard_size=0,
        poll_seconds=1.0, keep_snapshots=2, scann=None))
    return c
