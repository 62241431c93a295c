"""RAG-Sequence on FEVER fact verification (the RAG paper's setting): the input is the
claim, the target the label's word, generated and mapped back to the class (scored as
classification: label accuracy; KILT R-precision and recall@5 of the evidence pages when the
data names them); BART-large, the frozen document index, 5 documents, greedy thorough
decoding. 3-way labels (SUPPORTS, REFUTES, NOT ENOUGH INFO), or the paper's 2-way set with
`:two_way`. Everything else is configs/rag.py's.

    realm-jax train --config configs/rag_fever.py --workdir W --config.data.corpus=passages \
        --config.data.train=fever_train.jsonl --config.data.eval=fever_dev.jsonl \
        --config.model.question_encoder_hf=QUESTION --config.model.generator_hf=BART
    realm-jax eval --workdir W          # WORKDIR/eval/metrics.json

Data: FEVER JSONL or KILT's FEVER (data.format "fever", "fever2" with two_way). Variants
(`configs/rag_fever.py:ARG`): two_way; tiny (configs/rag.py's toy sizes); tiny,two_way.
"""

from configs import common, rag


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, two_way=False)
    c = rag.get_config("tiny,sequence" if arg.tiny else "sequence")
    c.data.format = "fever2" if arg.two_way else "fever"
    c.eval.metrics = ("accuracy", "rprec", "recall@5")
    c.rag.max_target_length = min(c.rag.max_target_length, 8)
    if not arg.tiny:
        c.data.update(train="", eval="")
        c.rag.n_docs = 5
        c.eval.update(n_docs=5, num_beams=1, decoding="thorough")
    return c
