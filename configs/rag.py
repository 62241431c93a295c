"""RAG-Token on Natural Questions at the paper's size: DPR BERT-base question/context
encoders, BART-large generator, k = 5 documents in training, 15 read in evaluation (greedy
decoding, as the paper for open-domain QA).

    realm-jax prepare-corpus --input psgs_w100.jsonl --output passages --tokenizer CTX --mode dpr
    realm-jax refresh --config configs/rag.py --workdir W --once \
        --config.data.corpus=passages --config.model.context_encoder_hf=CTX
    realm-jax train --config configs/rag.py --workdir W --config.data.corpus=passages \
        --config.model.question_encoder_hf=QUESTION --config.model.generator_hf=BART
    realm-jax eval --workdir W

Variants (`--config configs/rag.py:ARG`, words joined by commas):
  sequence: RAG-Sequence (its loss; 50 documents and thorough decoding in evaluation);
  tiny: toy sizes, the whole code path on a CPU in seconds (the tests); any HF tokenizer
    folder works with it. `tiny,sequence` for RAG-Sequence.
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, sequence=False)
    c = common.experiment("rag")
    # question_tokenizer / generator_tokenizer: HF folders ("": the model folders' own).
    # format: "qa" (realm_jax.data.qa.load_qa, data.*_split apply) or a task file read by
    # realm_jax.data.tasks.read_task: "kilt", "msmarco", "jeopardy", "fever", "fever2".
    c.data = common.qa_data(question_tokenizer="", generator_tokenizer="", format="qa")
    c.rag = common.ConfigDict(dict(
        # "token": RAG-Token (marginal over documents at every target token); "sequence":
        # RAG-Sequence (over documents of the whole target's likelihood).
        loss="sequence" if arg.sequence else "token",
        # Documents per question in training; label smoothing eps; exclude_bos_score: drop
        # the first target position from the RAG-Sequence document scores.
        n_docs=5, label_smoothing=0.1, exclude_bos_score=False,
        # Token lengths: the question, the target, and `title / text // question`.
        max_source_length=128, max_target_length=40, max_combined_length=300))
    c.model = common.ConfigDict(dict(
        # HF folders: a DPR question encoder (or any retriever tower, or a RAG folder), the
        # frozen DPR context encoder the refresher embeds the corpus with, and BART (or a
        # RAG folder). "" for the first and the last: random weights of the sizes below.
        question_encoder_hf="", context_encoder_hf="", generator_hf="",
        question_encoder=common.bert_base(add_pooler=False),
        generator=common.bart_large(),
        # Train the context encoder too (retrieval.strategy "refresh" or "rerank"): a
        # doc_tower part from context_encoder_hf, which the refresher then embeds with.
        train_doc_tower=False))
    c.retrieval = common.ConfigDict(dict(
        # Search of the snapshot on the host: "scann" (its ScaNN index) or "exact" (numpy).
        backend="scann", **common.scann_threads(0),
        # The retriever's loss "emdr2", "pdist", "loop" go over the RAG-Sequence
        # per-document log-likelihoods (reader side stop-gradient); "rerank"'s
        # over_retrieve must be >= rag.n_docs.
        **common.end_to_end()))
    c.train = common.train(
        batch_size=128, steps=20_000, learning_rate=3e-5, warmup_steps=500,
        checkpoint_every=1000, log_every=50, weight_decay=0.001, clip_norm=0.1,
        # Scales the question encoder's (and a trained context encoder's) learning rate (a
        # pretrained encoder beside a generator trained from scratch wants a smaller one).
        question_encoder_lr_multiplier=1.0,
        # retrieval.strategy="refresh": the bounded staleness (0: none) as in REALM
        # pre-training (configs/realm.py).
        max_index_staleness=0,
        **common.index_wait(3600))
    c.eval = common.qa_eval(
        # Documents read per question (0: rag.n_docs); the paper's test setting: 15 for
        # RAG-Token, 50 with thorough decoding for RAG-Sequence.
        n_docs=50 if arg.sequence else 15, recall_at=(1, 5, 20), batch_size=32,
        # Greedy (num_beams 1) or beam search; at most max_length tokens with the start
        # token (0: rag.max_target_length + 1); RAG-Sequence decoding "thorough" or "fast".
        num_beams=1, max_length=0, min_length=1, length_penalty=1.0, decoding="thorough",
        # RAG-Token sampling instead of search (num_beams 1): temperature, top_k (0: off),
        # top_p (1: off), the key's seed.
        do_sample=False, temperature=1.0, top_k=50, top_p=1.0, seed=0,
        # What `realm-jax eval` scores (names of realm_jax.evaluate.score, as `realm-jax
        # score --metrics`); rprec and recall@K only count when the examples have provenance.
        # FEVER's generations are mapped to their labels first.
        metrics=("em", "f1"))
    # The refresher: the corpus embedded once by model.context_encoder_hf (`realm-jax
    # refresh --once`), and with retrieval.strategy "refresh" from the run's checkpoints.
    c.refresh = common.refresh(
        max_length=256, batch_size=512, shard_size=100_000, keep_snapshots=2,
        scann=dict(num_neighbors=100, num_threads=0))

    if arg.tiny:
        c.data.update(train="", eval="")
        c.rag.update(n_docs=3, label_smoothing=0.0, max_source_length=16, max_target_length=8,
                     max_combined_length=48)
        # vocab_size 0: a random part's vocabulary and special ids are its tokenizer's.
        c.model.question_encoder = common.tiny_encoder(
            vocab_size=0, max_position_embeddings=64, add_pooler=False)
        c.model.generator = common.tiny_bart()
        c.retrieval.scann_threads = 1
        c.train.update(common.TINY_TRAIN, weight_decay=0.0, clip_norm=1.0,
                       index_wait_seconds=300)
        c.eval.update(common.TINY_EVAL, n_docs=0)
        c.refresh = common.refresh(tiny=True)
    c.refresh.doc_tower_hf = c.model.get_ref("context_encoder_hf")
    return c
