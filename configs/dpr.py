"""DPR bi-encoder training (Karpukhin et al. 2020) at DPR's NQ settings: BERT-base towers
with CLS pooling and no projection, batch 128 questions, each with its positive and one
hard negative (in-batch + hard negatives), learning rate 2e-5, 40 epochs of NQ's 58,880
questions (18,400 steps), questions of 64 wordpieces and `title [SEP] text` passages of 256.

    realm-jax train --config configs/dpr.py --workdir W --config.data.train=train.json \
        --config.data.eval=dev.json --config.data.corpus=STORE --config.model.init_from_hf=DIR
    realm-jax eval --workdir W      # recall@1/5/20/100 of data.eval over data.corpus
    realm-jax mine --workdir W --input train.json --output mined.json

`configs/dpr.py:tiny`: toy sizes on a CPU (the tests).
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    c = common.experiment("dpr")
    # train / eval: DPR's JSON (an array of records) or JSONL; corpus: the block store
    # evaluation searches (`prepare-corpus --mode dpr`).
    c.data = common.data(train="", eval="")
    c.model = common.retriever_model(common.bert_base(add_pooler=False), pooling="cls",
                                     retriever_proj_size=0)
    c.dpr = common.ConfigDict(dict(
        # Hard negatives per question (hard_negative_ctxs, then negative_ctxs); row lengths
        # with special tokens; passages as `[CLS] title [SEP] text [SEP]` (title) or not.
        num_hard_negatives=1, question_length=64, passage_length=256, title=True))
    c.train = common.train(batch_size=128, steps=18_400, learning_rate=2e-5,
                           warmup_steps=1237, checkpoint_every=1000, log_every=50,
                           **common.retriever_train())
    c.eval = common.retriever_eval()
    c.refresh = common.refresh(max_length=256)
    if arg.tiny:
        c.model.encoder = common.tiny_encoder(vocab_size=30522, add_pooler=False)
        c.dpr.update(question_length=16, passage_length=32)
        c.train.update(common.TINY_TRAIN)
        c.eval.update(batch_size=8)
        c.refresh = common.refresh(tiny=True, max_length=32)
    return c
