"""RAG-Token on Jeopardy question generation (the RAG paper's setting): the input is the
answer entity, the target the clue; BART-large, the frozen document index, 10 documents,
beam search with 4 beams; scored by Q-BLEU-1, BLEU-1 and distinct tri-grams (diversity).
Everything else is configs/rag.py's.

    realm-jax train --config configs/rag_jeopardy.py --workdir W --config.data.corpus=passages \
        --config.data.train=jeopardy_train.jsonl --config.data.eval=jeopardy_dev.jsonl \
        --config.model.question_encoder_hf=QUESTION --config.model.generator_hf=BART
    realm-jax eval --workdir W          # WORKDIR/eval/metrics.json

Data: SearchQA-style JSONL ({"question": the clue, "answer": the entity}; data.format
"jeopardy"). Variant `tiny` (`configs/rag_jeopardy.py:tiny`): configs/rag.py's toy sizes.
"""

from configs import common, rag


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    c = rag.get_config("tiny" if arg.tiny else "")
    c.data.format = "jeopardy"
    c.eval.metrics = ("qbleu1", "bleu1", "distinct3")
    if not arg.tiny:
        c.data.update(train="", eval="")
        c.rag.update(n_docs=10, max_target_length=64)
        c.eval.update(n_docs=10, num_beams=4)
    return c
