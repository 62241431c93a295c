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
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.init_from_hf = ""          # a local HF folder (e.g. a REALM or BERT checkpoint)
    c.model.encoder = bert_base()
    c.model.retriever_proj_size = 128
    c.model.pooling = "pooler"
    c.retrieval = ml_collections.ConfigDict(dict(
        num_candidates=8, query_length=96, block_length=288, mode="scann"))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))   # (data, fsdp, tensor)
    c.sharding_rules = None                                      # None: realm_jax.sharding.DEFAULT_RULES
    c.train = ml_collections.ConfigDict(dict(
        batch_size=512, steps=200_000, learning_rate=3e-5, warmup_steps=10_000,
        checkpoint_every=500, peak_flops_per_device=197e12))
    # The refresher (realm-jax refresh): see realm_jax.refresh.RefreshSettings.
    c.refresh = ml_collections.ConfigDict(dict(
        corpus="",            # block store folder (realm-jax prepare-corpus), or --corpus
        tokenizer="",         # HF folder the corpus was tokenized with ("": --from_hf's)
        title="auto",         # auto: titles for DPR passages; yes / no
        max_length=0,         # 0: the tower's max_position_embeddings
        batch_size=256, dtype="float16", shard_size=1_000_000, poll_seconds=30.0,
        keep_snapshots=3,
        scann=dict(brute_force_below=20_000, num_neighbors=10, reorder=100, num_threads=0)))
    return c
