"""ORQA / REALM open-QA fine-tuning on Natural Questions (open) at the paper's settings
(google-research/language orqa_experiment.py): BERT-base query tower and span reader,
retriever beam 5000 for the retrieval loss, top 5 blocks read, spans of at most 10
wordpieces (span head 256 wide), questions of 64 wordpieces, blocks of 288, reader input
288 + 32, learning rate 1e-5 with ORQA's warmup (a tenth of the steps, 100..10000), the
document index frozen.

    # the index: a REALM pre-training run's, or the corpus embedded by a pretrained tower
    realm-jax refresh --config configs/orqa_nq.py --workdir W --once --from_hf DOC_TOWER \
        --config.data.corpus=blocks --config.data.tokenizer=BERT
    realm-jax train --config configs/orqa_nq.py --workdir W --config.data.corpus=blocks \
        --config.data.tokenizer=BERT --config.model.init_from_realm=REALM_WORKDIR
    realm-jax eval --workdir W --config.data.eval_split=test

Questions: TFDS natural_questions_open (prepared under data.data_dir; `train` and
`validation`), or any QA file (--config.data.train=nq-train.jsonl). ORQA read one question
per step (79,168 steps an epoch); the batch here is 8 questions so that the batch shards
over a data-parallel mesh (4 epochs: 40,000 steps).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "orqa"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        corpus="", tokenizer="", train="tfds:natural_questions_open", train_split="train",
        eval="tfds:natural_questions_open", eval_split="validation", data_dir="",
        cloze_questions=0))
    c.model = ml_collections.ConfigDict()
    c.model.init_from_realm = ""      # a REALM pre-training workdir (query tower, reader)
    c.model.realm_step = -1
    c.model.init_from_hf = ""         # or one BERT folder for both parts
    c.model.query_tower_hf = ""       # or per part: a REALM embedder / DPR question encoder
    c.model.reader_hf = ""            # a RealmReader folder, or any BERT (span head new)
    c.model.encoder = ml_collections.ConfigDict(dict(
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
        dropout_rate=0.1, attention_dropout_rate=0.1, pad_token_id=0, add_pooler=True,
        dtype="bfloat16", scan_layers=False, remat=True))
    c.model.retriever_proj_size = 128
    c.model.pooling = "pooler"
    c.model.span_hidden_size = 256
    c.model.max_span_width = 10
    c.retrieval = ml_collections.ConfigDict(dict(
        index="", mode="device", beam_size=5000, num_read=5, query_length=64,
        block_length=288, reader_length=288 + 32, score_scale=1.0, search_block_size=4096))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))   # (data, fsdp, tensor)
    c.sharding_rules = None
    steps = 40_000
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8, steps=steps, learning_rate=1e-5,
        # lr_multipliers: each part's learning rate (weight decay included) as a factor of
        # learning_rate; 0 freezes the part.
        lr_multipliers=dict(query_tower=1.0, reader=1.0),
        warmup_steps=min(10_000, max(100, steps // 10)), decay="linear", weight_decay=0.01,
        clip_norm=1.0, checkpoint_every=1000, keep_checkpoints=3, async_checkpoints=True,
        log_every=50, peak_flops_per_device=197e12, eval_questions=1000, eval_every=1000,
        fast_compile=False))
    # fast_compile: cheap XLA compilation (CPU tests). allow_model_changes: model config
    # fields (e.g. "remat", "dtype") a resumed run may change without being refused.
    c.train.fast_compile = c.train.get("fast_compile", False)
    c.train.allow_model_changes = ()
    # ORQA's evaluation: exact match of the best span of the top 5 blocks; recall@k of them.
    c.eval = ml_collections.ConfigDict(dict(num_questions=0, batch_size=64, recall_at=(1, 5)))
    # `realm-jax refresh --once --from_hf`: the frozen index (no ScaNN: ORQA searches the
    # embeddings on the devices).
    c.refresh = ml_collections.ConfigDict(dict(
        title="auto", max_length=0, batch_size=256, dtype="float16", shard_size=1_000_000,
        poll_seconds=30.0, keep_snapshots=3, scann=None))
    return c
