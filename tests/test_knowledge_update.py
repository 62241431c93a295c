"""The knowledge-update demo on real text (docs/knowledge_updates.md): Wikipedia articles
from gensim's sample, MiniLM for both towers (configs/retrieval.py), `realm-jax search`;
a fact changed with `corpus update`, `refresh --once` re-embeds that article's blocks only,
the same question retrieves the new text; the article removed, it is never retrieved."""

import json
from pathlib import Path

import pytest

from realm_jax import cli
from realm_jax.data import BlockStore
from realm_jax.data.readers import SkipCounter, read_documents

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "retrieval.py") + ":tiny"
QUESTION = "Who directed the Catalan film Actrius?"


@pytest.fixture(scope="module")
def articles(wiki_sample_path):
    """The sample's short articles (under 1000 words), Actrius among them."""
    docs = [d for d in read_documents(wiki_sample_path, SkipCounter(), fmt="wiki_xml")
            if len(d.text.split()) < 1000][:8]
    assert "Actrius" in [d.title for d in docs]
    return docs


def _jsonl(path: Path, docs) -> str:
    path.write_text("".join(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text})
                            + "\n" for d in docs))
    return str(path)


def _search(capsys, workdir, *questions) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["search", "--workdir", str(workdir), "--top_k", "3", "--json",
                     *questions]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _refresh(workdir, store) -> dict:
    assert cli.main(["refresh", "--config", CONFIG, "--workdir", str(workdir), "--once",
                     "--no_progress", f"--config.data.corpus={store}"]) == 0
    lines = (Path(workdir) / "refresh_log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_fact_changed_and_removed_without_training(tmp_path, articles, minilm_path, capsys):
    store, workdir = tmp_path / "store", tmp_path / "w"
    assert cli.main(["prepare-corpus", "--input", _jsonl(tmp_path / "docs.jsonl", articles),
                     "--output", str(store), "--tokenizer", minilm_path, "--mode", "dpr",
                     "--no_progress"]) == 0
    first = _refresh(workdir, store)
    with BlockStore.open(store) as v0:
        assert first["embedded"] == len(v0) and first["reused"] == 0
    [before] = _search(capsys, workdir, QUESTION)
    assert before["question"] == QUESTION and len(before["results"]) == 3
    top = before["results"][0]
    assert top["title"] == "Actrius" and "Ventura Pons" in top["text"]
    assert set(top) == {"id", "title", "text", "score", "block"}
    actrius = next(d for d in articles if d.title == "Actrius")
    assert top["id"] == actrius.doc_id

    # the fact changes in the document
    changed = actrius.text.replace("Ventura Pons", "Pedro Almodóvar")
    edit = tmp_path / "edit.jsonl"
    edit.write_text(json.dumps({"id": actrius.doc_id, "title": "Actrius", "text": changed})
                    + "\n")
    assert cli.main(["corpus", "update", "--store", str(store), "--add", str(edit)]) == 0
    assert "1 replaced" in capsys.readouterr().out
    second = _refresh(workdir, store)
    with BlockStore.open(store) as v1:
        new_blocks = len(v1) - len(v0)
        assert second["embedded"] == new_blocks  # that article's blocks only
        assert second["reused"] == int(v1.live.sum()) - new_blocks
    [after] = _search(capsys, workdir, QUESTION)
    top = after["results"][0]
    assert top["id"] == actrius.doc_id and top["block"] >= len(v0)
    assert "Pedro Almodóvar" in top["text"] and "Ventura Pons" not in top["text"]

    # the document removed: never retrieved again, whatever the question
    (tmp_path / "gone.txt").write_text(actrius.doc_id + "\n")
    assert cli.main(["corpus", "update", "--store", str(store), "--remove",
                     str(tmp_path / "gone.txt")]) == 0
    third = _refresh(workdir, store)
    assert third["embedded"] == 0
    results = _search(capsys, workdir, QUESTION, "Pedro Almodóvar", "Ventura Pons film",
                      "Catalan drama film about actresses")
    assert len(results) == 4
    assert all(r["id"] != actrius.doc_id for line in results for r in line["results"])
