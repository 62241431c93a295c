"""ICT (ORQA's Inverse Cloze Task) retriever pre-training at ORQA's settings: BERT-base
towers with REALM's pooler and 128-d projection, batch 4096 (every other pseudo-query's
context a negative), 100,000 steps at learning rate 1e-4, queries of 64 wordpieces and
blocks of 288, the sentence removed from its block with probability 0.9.

    realm-jax train --config configs/ict.py --workdir W --config.data.corpus=STORE \
        --config.data.tokenizer=BERT_FOLDER
    realm-jax eval --workdir W            # held-out pseudo-queries: recall@k of their block

The run's parts `query_tower` and `doc_tower` start REALM pre-training (`realm-jax convert
--workdir W --part query_tower --out Q` and `--part doc_tower --out D`, then
--config.model.query_tower_hf=Q --config.model.doc_tower_hf=D) and ORQA
(`--config.model.init_from_realm=W`). `configs/ict.py:tiny`: toy sizes on a CPU.
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    c = common.experiment("ict")
    # heldout_fraction: documents whose blocks give no training query (ICT's evaluation).
    c.data = common.data(heldout_fraction=0.01)
    c.model = common.retriever_model(common.bert_base())
    c.ict = common.ConfigDict(dict(
        # Wordpieces of a query sentence and of a context block, with their special tokens;
        # the chance that the sentence is removed from its block (ORQA: 0.9).
        query_length=64, context_length=288, remove_probability=0.9))
    c.train = common.train(batch_size=4096, steps=100_000, learning_rate=1e-4,
                           warmup_steps=10_000, checkpoint_every=5000, log_every=100,
                           **common.retriever_train())
    c.eval = common.retriever_eval()
    c.refresh = common.refresh(max_length=288)
    if arg.tiny:
        # MiniLM's vocabulary (the test stores hold its token ids).
        c.model.encoder = common.tiny_encoder(vocab_size=30522)
        c.model.retriever_proj_size = 16
        c.data.heldout_fraction = 0.34
        c.ict.update(query_length=24, context_length=32)
        c.train.update(common.TINY_TRAIN)
        c.eval.update(batch_size=8, recall_at=(1, 5, 20, 100))
        c.refresh = common.refresh(tiny=True, max_length=32)
    return c
