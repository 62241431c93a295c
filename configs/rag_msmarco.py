"""RAG on MS MARCO NLGen abstractive answers (the RAG paper's setting): RAG-Token, or
RAG-Sequence with `:sequence` (fast decoding, as the paper for long generations); BART-large,
the frozen document index, 10 documents, beam search with 4 beams; scored by BLEU-1 and
ROUGE-L against the well-formed answers. Everything else is configs/rag.py's.

    realm-jax train --config configs/rag_msmarco.py[:sequence] --workdir W \
        --config.data.corpus=passages --config.data.train=train_v2.1.json \
        --config.data.eval=dev_v2.1.json --config.model.question_encoder_hf=QUESTION \
        --config.model.generator_hf=BART
    realm-jax eval --workdir W          # WORKDIR/eval/metrics.json

Data: MS MARCO v2.1 .json (or JSONL with its fields; data.format "msmarco"). Variants
(`configs/rag_msmarco.py:ARG`): sequence; tiny (configs/rag.py's toy sizes); tiny,sequence.
"""

from configs import common, rag


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, sequence=False)
    c = rag.get_config(",".join(w for w in ("tiny", "sequence") if arg[w]))
    c.data.format = "msmarco"
    c.eval.metrics = ("bleu1", "rougeL")
    c.eval.decoding = "fast"
    if not arg.tiny:
        c.data.update(train="", eval="")
        c.rag.update(n_docs=10, max_target_length=80)
        c.eval.update(n_docs=10, num_beams=4)
    return c
