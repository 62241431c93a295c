"""RAG beyond short answers on data made from the Wikipedia sample: Jeopardy-shaped entity ->
sentence generation, MS-MARCO-shaped question -> sentence answers, and FEVER-shaped claims
(supported: a passage's first sentence; refuted: the same sentence with its entity swapped
for another article's title). Each task's config (configs/rag_jeopardy.py, rag_msmarco.py,
rag_fever.py, `:tiny` sizes with a bigger BART) is trained by the real trainer over the
frozen index of the passages, and `realm-jax eval` scores step 0 and the last step.

    python benchmarks/rag_tasks.py --out /tmp/rag_tasks [--steps 300] [--tasks jeopardy,...]

Synthetic data from the sample, not the papers' datasets: the figures show that each task's
path learns and is scored, not how RAG does on Jeopardy, MS MARCO or FEVER.
"""

from __future__ import annotations

import argparse
import json
import random
import re
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


def _without(sentence: str, title: str, placeholder: str) -> str:
    return re.sub(re.escape(title), placeholder, sentence, flags=re.IGNORECASE)


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
        if title in seen or title.lower() not in sentence.lower() or len(titles) < 2:
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


def main(argv: Sequence[str] | None = None) -> None:
    raise SystemExit("not implemented yet")


if __name__ == "__main__":
    main(sys.argv[1:])
