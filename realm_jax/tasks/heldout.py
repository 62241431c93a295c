"""Held-out evaluation for REALM pre-training.

A fraction of the corpus's documents (`data.heldout_fraction`) is held out of training:
the trainer draws its masked queries from the other documents only. A fixed set of
`train.eval_queries` masked sentences from the held-out documents (one per block, chosen
with the config seed) is scored without dropout, through the newest index snapshot in the
configured retrieval mode, at the start, every `train.eval_every` steps and at the end:
`heldout_loss` and `heldout_retrieval_utility` (the marginal MLM loss and its gain over the
null document), measured on sentences the model never trained on. From the second
evaluation on, `heldout_retrieval_utility_change` is its change since the run's first
evaluation (`heldout_baseline_step`), paired over the same queries, with a standard error
(`heldout_retrieval_utility_change_se`): a few dozen queries measure the utility only to a
few hundredths. The first evaluation's per-query terms are kept in the workdir
(`heldout_baseline.json`), so a resumed run still measures its change from step 0.

Retrieval can only help a query whose answer some readable block holds, and on a small corpus
many held-out answers are in none. The same figures are therefore also given for the
`heldout_answerable_` queries: those whose masked wordpieces occur, in order, in a block the
query may read (`realm.AnswerFinder`), and for the `heldout_unanswerable_` rest. The subsets
are fixed by the corpus alone, not by what the index retrieves, so their changes are paired
over the same queries throughout the run. What the index retrieves is measured apart:
`heldout_answer_recall` is the share of the answerable queries whose answer one of their
retrieved candidates holds, the retriever's own figure (the reader can copy an answer only
from a candidate that has it).

The held-out documents stay in the index: they are knowledge, not answers. A held-out
sentence never retrieves its own block (or its whole document, with
`retrieval.exclude="document"`), as in training, and no training query masks a held-out
sentence.
"""

from __future__ import annotations

import fractions
import json
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import sharding
from realm_jax.data.realm_examples import (CANDIDATE_FIELDS, QUERY_FIELDS, MaskedQuery,
                                          QueryMaker, collate_queries)
from realm_jax.data.store import BlockStore
from realm_jax.index.embed_corpus import tree_digest
from realm_jax.tasks.end_to_end import question_batch

PREFIX = "heldout_"

_log = logging.getLogger(__name__)


def heldout_documents(num_documents: int, fraction: float) -> np.ndarray:
    """bool [num_documents]: which documents are held out.

    Document d is held out when floor(d * fraction) steps up at d: for 0.1 the documents
    0, 10, 20, ... (the first of every ten), ceil(num_documents * fraction) in all, spread
    evenly over the corpus and fixed by the document order alone (no seed)."""
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return np.zeros(num_documents, bool)
    f = fractions.Fraction(fraction).limit_denominator(1_000_000)
    d = np.arange(num_documents, dtype=np.int64)
    return (d * f.numerator) // f.denominator != ((d - 1) * f.numerator) // f.denominator


def split_blocks(store: BlockStore, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training block ids, held-out block ids) of `store`, split by source document
    (`heldout_documents`), ascending."""
    docs = np.asarray(store.doc_index, np.int64)
    if not len(docs):
        raise ValueError(f"block store {store.path} is empty")
    held = heldout_documents(int(docs.max()) + 1, fraction)[docs]
    train, heldout = np.flatnonzero(~held), np.flatnonzero(held)
    if not len(train):
        raise ValueError(f"data.heldout_fraction={fraction} leaves no training document in "
                         f"{store.path}")
    return train, heldout


def heldout_queries(store: BlockStore, maker: QueryMaker, block_ids: Sequence[int], num: int,
                    seed: int) -> list[MaskedQuery]:
    """Up to `num` masked queries from the blocks `block_ids`: the blocks in a seeded order,
    one query (seeded) from each block that has one. The same arguments give the same
    queries."""
    rng = np.random.default_rng([int(seed), 0x4E1D])
    out: list[MaskedQuery] = []
    if num <= 0:
        return out
    for block_id in rng.permutation(np.asarray(block_ids, np.int64)).tolist():
        queries = maker.from_block(store, int(block_id), seed=int(rng.integers(2**31)))
        if queries:
            out.append(queries[int(rng.integers(len(queries)))])
            if len(out) == num:
                break
    return out


def pad_batch(batch: dict, multiple: int) -> dict:
    """Rows appended (copies of row 0 with no valid masked token, so they weigh nothing in
    the loss) until the batch size divides by `multiple`."""
    n = len(batch["input_ids"])
    pad = -n % multiple
    if not pad:
        return batch
    out = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
    out["mask_valid"][n:] = False
    return out


class HeldoutEval:
    """The held-out evaluation: a fixed batch of held-out queries scored by a jitted
    `loss_fn` without dropout.

    `loss_fn`: a `realm.RealmLossFn`; in `scann` mode call with the snapshot's
    `HostRetriever` (the candidates are searched on the host), in `device` mode with the
    corpus arrays (searched inside the jitted function).

    `baseline_file`: where the first evaluation's per-query terms are written (process 0)
    and, with `resume=True`, read back from. A file of other queries (another seed, corpus
    or eval_queries) is ignored with a warning: this run's first evaluation is the baseline.

    `finder`: a `realm.AnswerFinder` of the corpus, for the answerable / unanswerable
    figures and `heldout_answer_recall` (module docstring).

    `batch_size`: queries scored per call of the jitted function (rounded up to a multiple of
    the batch shards), so that memory does not grow with the number of held-out queries."""

    def __init__(self, loss_fn, queries: Sequence[MaskedQuery], *, mesh, param_shardings,
                 corpus_shardings=None, baseline_file: str | os.PathLike | None = None,
                 resume: bool = False, finder=None, batch_size: int = 64):
        if not queries:
            raise ValueError("HeldoutEval: no held-out queries")
        self.queries = list(queries)
        self.num_queries = len(queries)
        self.finder = finder
        self.answerable = (None if finder is None
                           else np.array([finder(q) for q in queries], bool))
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.chunk = sharding.batch_multiple(min(max(int(batch_size), 1), len(queries)), mesh)
        batch = collate_queries(queries)
        self.queries_fingerprint = tree_digest(
            {k: batch[k] for k in QUERY_FIELDS}).hexdigest()[:16]
        self.batch = pad_batch(batch, self.chunk)
        self.scann = loss_fn.mode == "scann"
        self.fields = QUERY_FIELDS + (CANDIDATE_FIELDS if self.scann else ())
        self.baseline_file = baseline_file
        # (step, (summed utility, masked tokens) per query) of the run's first evaluation
        self.baseline: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
        if resume and baseline_file is not None:
            self.baseline = self._read_baseline()

        def metrics(params, batch, corpus):
            """Per query: the summed marginal log-probability and utility of its masked
            tokens, their count, its top candidate's and the null document's retrieval
            probability, and its candidates."""
            out, batch = loss_fn.scored(params, batch, corpus, None)
            retrieval = jnp.exp(out.retrieval_log_probs)
            return dict(log_prob=out.marginal_log_probs.sum(-1),
                        utility=(out.marginal_log_probs - out.null_log_probs).sum(-1),
                        tokens=jnp.asarray(batch["mask_valid"], jnp.float32).sum(-1),
                        top_prob=retrieval.max(-1), null_prob=retrieval[:, 0],
                        cand_ids=batch["cand_ids"])

        self._metrics = jax.jit(metrics, in_shardings=(
            param_shardings, self.batch_sharding, corpus_shardings),
            out_shardings=sharding.replicated(mesh))

    def __call__(self, params, corpus_arrays=None, retriever=None, *, step: int = 0
                 ) -> dict[str, float]:
        """heldout_loss, heldout_retrieval_utility, heldout_masked_tokens, ... as floats, of
        the params at training step `step`."""
        if self.scann and retriever is None:
            raise ValueError("HeldoutEval: scann mode needs the snapshot's HostRetriever")
        chunks = []
        for start in range(0, len(self.batch["input_ids"]), self.chunk):
            batch = {k: v[start:start + self.chunk] for k, v in self.batch.items()}
            if self.scann:
                batch = retriever(batch)
            batch = question_batch({k: np.asarray(batch[k]) for k in self.fields},
                                   self.batch_sharding)
            chunks.append(jax.device_get(self._metrics(params, batch, corpus_arrays)))
        values = {k: np.concatenate([np.asarray(c[k]) for c in chunks])[:self.num_queries]
                  for k in chunks[0]}
        log_prob, utility, tokens = (values[k].astype(np.float64)
                                     for k in ("log_prob", "utility", "tokens"))
        per_query = (utility, tokens)
        total = tokens.sum()
        out = {PREFIX + "loss": float(-log_prob.sum() / max(total, 1.0)),
               PREFIX + "retrieval_utility": float(utility.sum() / max(total, 1.0)),
               PREFIX + "masked_tokens": float(total),
               PREFIX + "top_candidate_prob": float(values["top_prob"].mean()),
               PREFIX + "null_prob": float(values["null_prob"].mean()),
               PREFIX + "queries": float(self.num_queries)}
        first = self.baseline is None
        if first:
            self.baseline = (int(step), per_query)
            if self.baseline_file is not None and jax.process_index() == 0:
                self._write_baseline()
        subsets = [("", slice(None))]
        if self.answerable is not None:
            subsets += [("answerable_", self.answerable), ("unanswerable_", ~self.answerable)]
            for name, rows in subsets[1:]:
                out[PREFIX + name + "queries"] = float(rows.sum())
                utility, tokens = (x[rows] for x in per_query)
                out[PREFIX + name + "retrieval_utility"] = (
                    float(utility.sum() / tokens.sum()) if tokens.sum() else float("nan"))
            found = [self.finder.in_blocks(q, ids)
                     for q, ids in zip(self.queries, values["cand_ids"])]
            out[PREFIX + "answer_recall"] = (float(np.sum(found) / self.answerable.sum())
                                             if self.answerable.any() else float("nan"))
        if not first:
            for name, rows in subsets:
                change, se = paired_change(*((u[rows], n[rows])
                                             for u, n in (self.baseline[1], per_query)))
                out[PREFIX + name + "retrieval_utility_change"] = change
                out[PREFIX + name + "retrieval_utility_change_se"] = se
        out[PREFIX + "baseline_step"] = float(self.baseline[0])
        return out

    def reset_baseline(self) -> None:
        """The next evaluation becomes the one the later changes are measured from."""
        self.baseline = None

    def _write_baseline(self) -> None:
        from realm_jax.durable import atomic_write_text

        step, (utility, tokens) = self.baseline
        atomic_write_text(self.baseline_file, json.dumps(dict(
            step=step, queries_fingerprint=self.queries_fingerprint,
            query_utility=utility.tolist(), query_tokens=tokens.tolist())) + "\n")

    def _read_baseline(self):
        from etils import epath

        path = epath.Path(self.baseline_file)
        if not path.exists():
            _log.warning("no held-out baseline at %s: the change is measured from this "
                         "run's first evaluation", path)
            return None
        try:
            saved = json.loads(path.read_text())
            per_query = (np.asarray(saved["query_utility"], np.float64),
                         np.asarray(saved["query_tokens"], np.float64))
            step, fingerprint = int(saved["step"]), saved["queries_fingerprint"]
        except (ValueError, KeyError, TypeError) as e:
            _log.warning("held-out baseline %s is unreadable (%r): the change is measured "
                         "from this run's first evaluation", path, e)
            return None
        if fingerprint != self.queries_fingerprint:
            _log.warning("held-out baseline %s was measured on other queries (another seed, "
                         "corpus or train.eval_queries): the change is measured from this "
                         "run's first evaluation", path)
            return None
        return step, per_query


def paired_change(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray]
                  ) -> tuple[float, float]:
    """(change, standard error) of the token-weighted mean utility between two evaluations of
    the same queries, each given as (summed utility per query, masked tokens per query).

    The change is exactly the difference of the two means. Its standard error treats the
    queries, not the tokens, as the independent draws (the tokens of one span rise and fall
    together): the ratio estimator's sqrt(Q / (Q - 1) * sum_q (d_q - n_q * change)^2) / N
    over the Q queries with tokens, d_q the change of query q's sum, n_q its tokens, N all."""
    (s0, n0), (s1, n1) = before, after
    if not np.array_equal(n0, n1):
        raise ValueError("paired_change: the two evaluations scored different tokens")
    keep = n0 > 0
    d, n = (s1 - s0)[keep], n0[keep]
    total, q = n.sum(), len(n)
    if q == 0:
        return 0.0, float("nan")
    change = d.sum() / total
    se = (np.sqrt(q / (q - 1) * np.sum((d - n * change) ** 2)) / total if q > 1
          else float("nan"))
    return float(change), float(se)
