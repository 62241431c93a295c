"""ORQA / REALM open-QA fine-tuning on Natural Questions (open) at the paper's settings
(google-research/language orqa_experiment.py): BERT-base query tower and span reader,
retriever beam 5000 for the retrieval loss, top 5 blocks read, spans of at most 10
wordpieces (span head 256 wide), questions of 64 wordpieces, blocks of 288, reader input
288 + 32, learning rate 1e-5 with ORQA's warmup (a tenth of the steps, 100..10000), the
document index frozen.

    # the index: a REALM pre-training run's, or the corpus embedded by a pretrained tower
    realm-jax refresh --config configs/orqa.py --workdir W --once --from_hf DOC_TOWER \
        --config.data.corpus=blocks --config.data.tokenizer=BERT
    realm-jax train --config configs/orqa.py --workdir W --config.data.corpus=blocks \
        --config.data.tokenizer=BERT --config.model.init_from_realm=REALM_WORKDIR
    realm-jax eval --workdir W --config.data.eval_split=test

Questions: TFDS natural_questions_open (prepared under data.data_dir; `train` and
`validation`), or any QA file (--config.data.train=nq-train.jsonl). ORQA read one question
per step (79,168 steps an epoch); the batch here is 8 questions so that the batch shards
over a data-parallel mesh (4 epochs: 40,000 steps).

`configs/orqa.py:tiny`: toy sizes, the whole code path on a CPU in seconds (the tests);
its questions are cloze questions made from the corpus.
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    c = common.experiment("orqa")
    # data.train / eval may also be "cloze": cloze_questions questions made from the corpus
    # (the same split name gives the same questions).
    c.data = common.qa_data(cloze_questions=0)
    c.model = common.bert_model(
        common.bert_base(scan_layers=False),
        # A REALM pre-training workdir (query tower; reader encoder under a new span head)
        # and its checkpoint realm_step (-1: the newest); query_tower_hf / reader_hf / later
        # fields replace its parts.
        init_from_realm="", realm_step=-1,
        # The span reader's head: hidden width; spans of at most max_span_width wordpieces.
        span_hidden_size=256, max_span_width=10,
        # Train the document tower too (retrieval.strategy "refresh" or "rerank"): a
        # doc_tower part, from init_from_realm's doc_tower, else refresh.doc_tower_hf, else
        # init_from_hf (the tower that built the index).
        train_doc_tower=False)
    c.retrieval = common.retrieval(
        query_length=64,
        # The frozen IndexStore root ("": WORKDIR/index); beam_size: retriever beam for the
        # retrieval loss; num_read: top blocks read by the span reader; reader_length: of
        # `[CLS] question [SEP] block [SEP]`, the block cut to fit (0: query + block length).
        index="", beam_size=5000, num_read=5, reader_length=288 + 32,
        **common.end_to_end())
    steps = 40_000
    c.train = common.train(
        batch_size=8, steps=steps, learning_rate=1e-5,
        warmup_steps=min(10_000, max(100, steps // 10)), checkpoint_every=1000, log_every=50,
        **common.lr_multipliers(query_tower=1.0, reader=1.0),
        # Evaluation while training: the first eval_questions of data.eval (0: none), at the
        # start, every eval_every steps (0: never) and at the end.
        eval_questions=1000, eval_every=1000,
        # retrieval.strategy="refresh": the wait for an index snapshot, and the bounded
        # staleness (0: none) as in REALM pre-training (configs/realm.py).
        **common.index_wait(0), max_index_staleness=0)
    # ORQA's evaluation: exact match of the best span of the top num_read blocks.
    c.eval = common.qa_eval()
    # `realm-jax refresh --once --from_hf`: the frozen index (no ScaNN: ORQA searches the
    # embeddings on the devices).
    c.refresh = common.refresh(scann=None)

    if arg.tiny:
        c.data.update(train="cloze", eval="cloze", cloze_questions=32)
        c.model.encoder = common.tiny_encoder()
        c.model.update(retriever_proj_size=16, span_hidden_size=32)
        c.retrieval.update(common.TINY_RETRIEVAL, beam_size=8, num_read=3, reader_length=0)
        c.train.update(common.TINY_TRAIN, eval_questions=16, eval_every=0)
        c.eval.update(common.TINY_EVAL)
        c.refresh = common.refresh(tiny=True, scann=None)
    return c
