"""RAG at toy size: the whole code path on a CPU in seconds (used by the tests).

`--config configs/tiny_rag.py:sequence` for RAG-Sequence. A random part takes its vocabulary
and special token ids from its tokenizer (vocab_size=0), so any HF tokenizer folder works."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "rag"
    c.seed = 0
    # corpus: a passage block store (`realm-jax prepare-corpus --mode dpr`) and tokenizer: the
    # HF folder it was made with (the context encoder's; "" for the refresher's --from_hf).
    # train / eval: QA data for realm_jax.data.qa.load_qa (JSONL, TSV or tfds:NAME) and their
    # splits. question_tokenizer / generator_tokenizer: "" for the model folders' own.
    c.data = ml_collections.ConfigDict(dict(
        corpus="", tokenizer="", train="", train_split="train", eval="", eval_split="validation",
        data_dir="", question_tokenizer="", generator_tokenizer=""))
    c.rag = ml_collections.ConfigDict(dict(
        loss="sequence" if arg == "sequence" else "token", n_docs=3, label_smoothing=0.0,
        exclude_bos_score=False, max_source_length=16, max_target_length=8,
        max_combined_length=48))
    c.model = ml_collections.ConfigDict()
    # HF folders: a DPR question encoder (or any retriever tower, or a RAG folder), BART (or a
    # RAG folder), and the frozen DPR context encoder the refresher embeds the corpus with.
    # "" for the first two: random weights of the sizes below.
    c.model.question_encoder_hf = ""
    c.model.context_encoder_hf = ""
    c.model.generator_hf = ""
    c.model.question_encoder = ml_collections.ConfigDict(dict(
        vocab_size=0, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
        dropout_rate=0.0, attention_dropout_rate=0.0, pad_token_id=0, add_pooler=False,
        dtype="float32", scan_layers=False, remat=False))
    c.model.generator = ml_collections.ConfigDict(dict(
        vocab_size=0, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, activation_function="gelu",
        scale_embedding=False, dropout=0.0, attention_dropout=0.0, dtype="float32",
        scan_layers=False, remat=False))
    # backend: "scann" (the snapshot's ScaNN index) or "exact" (numpy) search on the host.
    c.retrieval = ml_collections.ConfigDict(dict(backend="scann", scann_threads=1))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.sharding_rules = None
    # question_encoder_lr_multiplier scales the question encoder's learning rate (a pretrained
    # encoder beside a generator trained from scratch wants a smaller one).
    c.train = ml_collections.ConfigDict(dict(
        lr_multipliers={},
        batch_size=8, steps=4, learning_rate=1e-3, question_encoder_lr_multiplier=1.0,
        warmup_steps=1, decay="linear", weight_decay=0.0, clip_norm=1.0, checkpoint_every=2,
        keep_checkpoints=3, async_checkpoints=True, log_every=1, index_wait_seconds=300,
        peak_flops_per_device=1e11))
    # fast_compile: cheap XLA compilation (CPU tests). allow_model_changes: model config
    # fields (e.g. "remat", "dtype") a resumed run may change without being refused.
    c.train.fast_compile = c.train.get("fast_compile", False)
    c.train.allow_model_changes = ()
    # Evaluation and answering: n_docs documents read per question (0: rag.n_docs), recall
    # of the top k retrieved for each k in recall_at; greedy or beam search (num_beams), at
    # most max_length tokens with the start token (0: rag.max_target_length + 1);
    # RAG-Sequence decoding "thorough" or "fast"; num_questions: 0 for the whole split.
    c.eval = ml_collections.ConfigDict(dict(
        n_docs=0, recall_at=(1, 3), batch_size=8, num_questions=0, num_beams=1, max_length=0,
        min_length=1, length_penalty=1.0, decoding="thorough"))
    # The refresher (realm-jax refresh --once): the corpus embedded once by
    # model.context_encoder_hf (the document side of RAG is frozen).
    c.refresh = ml_collections.ConfigDict(dict(
        title="auto", max_length=0, batch_size=16, dtype="float16", shard_size=0,
        poll_seconds=1.0, keep_snapshots=2,
        scann=dict(brute_force_below=20_000, num_neighbors=10, num_threads=1)))
    # The frozen context encoder embeds the corpus (the refresher's --from_hf default).
    c.refresh.doc_tower_hf = c.model.get_ref("context_encoder_hf")
    return c
