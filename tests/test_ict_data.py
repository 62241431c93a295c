"""ICT examples from a tiny block store: rows built by hand from the tokenizer, the removal
probability, per-element seeding, a checkpointable pipeline, fail-fast on one-sentence
blocks."""

import json

import numpy as np
import pytest

from realm_jax.data import BlockStore, load_tokenizer, prepare_corpus
from realm_jax.data.ict import IctExampleMaker, collate_ict, ict_dataset
from realm_jax.data.spans import split_sentences

DOCS = [
    ("Rivers", "The Nile flows north. It crosses eleven countries. Cairo lies on its banks."),
    ("Cities", "Paris is a city in France. It has many museums. The Louvre is one of them."),
    ("Music", "Bach wrote many cantatas. He lived in Leipzig."),
    ("Short", "Only one sentence here"),
]


def _write(path, docs):
    with open(path, "w") as f:
        for i, (title, text) in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "title": title, "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory, minilm_path):
    folder = tmp_path_factory.mktemp("ict")
    result = prepare_corpus(_write(folder / "docs.jsonl", DOCS), folder / "store",
                            tokenizer=minilm_path, mode="realm", max_tokens=64, progress=False)
    with BlockStore.open(result.path) as s:
        yield s


def _ids(tok, text):
    return tok.encode_batch([text])[0].ids


def test_rows_by_hand(store, tok):
    maker = IctExampleMaker(store, tok, query_length=12, context_length=40,
                            remove_probability=0.5, title=True)
    cls, sep = tok.backend.token_to_id("[CLS]"), tok.backend.token_to_id("[SEP]")
    text = store.text(0)
    sentences = split_sentences(text)
    assert len(sentences) == 3
    seen = set()
    for seed in range(40):
        ex = maker.example(0, np.random.default_rng(seed))
        seen.add((ex.sentence, ex.removed))
        s0, s1 = sentences[ex.sentence]
        query = [cls] + _ids(tok, text[s0:s1])[:10] + [sep]
        assert ex.query_input_ids.tolist() == query + [0] * (12 - len(query))
        assert ex.query_attention_mask.tolist() == [1] * len(query) + [0] * (12 - len(query))
        body = (_ids(tok, text[:s0]) + _ids(tok, text[s1:]) if ex.removed
                else _ids(tok, text))
        context = [cls] + _ids(tok, "Rivers") + [sep] + body + [sep]
        assert len(context) <= 40
        assert ex.context_input_ids.tolist() == context + [0] * (40 - len(context))
        assert ex.context_attention_mask.sum() == len(context)
    assert seen == {(i, r) for i in range(3) for r in (False, True)}
    # Without titles (the REALM store's default) the context starts with the text.
    plain = IctExampleMaker(store, tok, query_length=12, context_length=40,
                            remove_probability=0.0)
    ex = plain.example(0, np.random.default_rng(0))
    context = [cls] + _ids(tok, text) + [sep]
    assert not ex.removed
    assert ex.context_input_ids.tolist() == context + [0] * (40 - len(context))


def test_removal_probability(store, tok):
    maker = IctExampleMaker(store, tok, query_length=16, context_length=64)
    draws = [maker.example(1, np.random.default_rng([7, i])) for i in range(4000)]
    removed = np.mean([d.removed for d in draws])
    # 0.9 with a binomial standard deviation of sqrt(0.9 * 0.1 / 4000) = 0.0047.
    assert abs(removed - 0.9) < 4 * 0.0047
    counts = np.bincount([d.sentence for d in draws], minlength=3) / len(draws)
    np.testing.assert_allclose(counts, 1 / 3, atol=0.03)
    # A removed sentence's wordpieces are absent from the context: shorter by its length.
    full = store.lengths[1] + 2
    for d in draws[:50]:
        gone = int(d.query_attention_mask.sum()) - 2 if d.removed else 0
        assert int(d.context_attention_mask.sum()) == full - gone


def test_pipeline_skips_one_sentence_blocks_and_resumes(store, tok):
    maker = IctExampleMaker(store, tok, query_length=16, context_length=64)
    assert maker.example(3, np.random.default_rng(0)) is None  # "Only one sentence here"
    ds = ict_dataset(maker, batch_size=4, seed=3)
    it = iter(ds)
    first = next(it)
    assert first["query_input_ids"].shape == (4, 16)
    assert first["context_input_ids"].shape == (4, 64)
    assert set(first["block_id"].tolist()) <= {0, 1, 2}
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    assert 3 not in np.concatenate([b["block_id"] for b in after])
    resumed = iter(ict_dataset(maker, batch_size=4, seed=3))
    resumed.set_state(state)
    for want in after:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Another seed draws another sequence.
    other = next(iter(ict_dataset(maker, batch_size=4, seed=4)))
    assert any(not np.array_equal(other[k], first[k]) for k in first)
    # Two hosts each get their half of the global batch.
    half = next(iter(ict_dataset(maker, batch_size=4, seed=3, process_index=1,
                                 process_count=2)))
    np.testing.assert_array_equal(half["query_input_ids"], first["query_input_ids"][2:])


def test_fails_fast_without_multi_sentence_blocks(store, tok):
    maker = IctExampleMaker(store, tok)
    with pytest.raises(ValueError, match="no block .* has two or more sentences"):
        ict_dataset(maker, batch_size=2, seed=0, block_ids=np.array([3]))
    with pytest.raises(ValueError, match="no ICT examples"):
        collate_ict([])


def test_rejects_another_tokenizer(tmp_path, store):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3,
                                          "[PAD]": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match="is not the one block store"):
        IctExampleMaker(store, other)
