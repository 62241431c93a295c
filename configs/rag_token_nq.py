"""RAG-Token on Natural Questions at the paper's size: DPR BERT-base question/context
encoders, BART-large generator, k = 5 documents in training, 15 read in evaluation (greedy
decoding, as the paper for open-domain QA). `--config configs/rag_token_nq.py:sequence` gives
RAG-Sequence (configs/rag_sequence_nq.py).

    realm-jax prepare-corpus --input psgs_w100.jsonl --output passages --tokenizer CTX --mode dpr
    realm-jax refresh --config configs/rag_token_nq.py --workdir W --once \
        --config.data.corpus=passages --config.model.context_encoder_hf=CTX
    realm-jax train --config configs/rag_token_nq.py --workdir W --config.data.corpus=passages \
        --config.model.question_encoder_hf=QUESTION --config.model.generator_hf=BART
    realm-jax eval --workdir W
"""

import ml_collections


def get_config(arg=None):
    sequence = arg == "sequence"
    c = ml_collections.ConfigDict()
    c.task = "rag"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        corpus="", tokenizer="", train="tfds:natural_questions_open", train_split="train",
        eval="tfds:natural_questions_open", eval_split="validation", data_dir="",
        question_tokenizer="", generator_tokenizer=""))
    c.rag = ml_collections.ConfigDict(dict(
        loss="sequence" if sequence else "token", n_docs=5, label_smoothing=0.1,
        exclude_bos_score=False, max_source_length=128, max_target_length=40,
        max_combined_length=300))
    c.model = ml_collections.ConfigDict()
    c.model.question_encoder_hf = ""   # local folder of a DPR question encoder (or a RAG folder)
    c.model.context_encoder_hf = ""    # local folder of the DPR context encoder (frozen)
    c.model.generator_hf = ""          # local folder of BART (bart-large, or a RAG folder)
    c.model.question_encoder = ml_collections.ConfigDict(dict(
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
        dropout_rate=0.1, attention_dropout_rate=0.1, pad_token_id=0, add_pooler=False,
        dtype="bfloat16", scan_layers=True, remat=True))
    c.model.generator = ml_collections.ConfigDict(dict(
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="gelu",
        scale_embedding=False, dropout=0.1, attention_dropout=0.1, dtype="bfloat16",
        scan_layers=True, remat=True))
    c.retrieval = ml_collections.ConfigDict(dict(backend="scann", scann_threads=0))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))   # (data, fsdp, tensor)
    c.sharding_rules = None
    c.train = ml_collections.ConfigDict(dict(
        lr_multipliers={},
        batch_size=128, steps=20_000, learning_rate=3e-5, question_encoder_lr_multiplier=1.0,
        warmup_steps=500, decay="linear", weight_decay=0.001, clip_norm=0.1,
        checkpoint_every=1000, keep_checkpoints=3, async_checkpoints=True, log_every=50,
        index_wait_seconds=3600, peak_flops_per_device=197e12))
    # fast_compile: cheap XLA compilation (CPU tests). allow_model_changes: model config
    # fields (e.g. "remat", "dtype") a resumed run may change without being refused.
    c.train.fast_compile = c.train.get("fast_compile", False)
    c.train.allow_model_changes = ()
    # The paper's test setting: 15 documents for RAG-Token, 50 with thorough decoding for
    # RAG-Sequence; greedy decoding.
    c.eval = ml_collections.ConfigDict(dict(
        n_docs=50 if sequence else 15, recall_at=(1, 5, 20), batch_size=32, num_questions=0,
        num_beams=1, max_length=0, min_length=1, length_penalty=1.0, decoding="thorough"))
    c.refresh = ml_collections.ConfigDict(dict(
        title="auto", max_length=256, batch_size=512, dtype="float16", shard_size=100_000,
        poll_seconds=30.0, keep_snapshots=2,
        scann=dict(num_neighbors=100, num_threads=0)))
    # The frozen context encoder embeds the corpus (the refresher's --from_hf default).
    c.refresh.doc_tower_hf = c.model.get_ref("context_encoder_hf")
    return c
