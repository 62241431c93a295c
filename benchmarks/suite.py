"""Run the benchmarks and rewrite docs/benchmarks.md from what they measured.

Each benchmark runs as its own process (`python benchmarks/bench_NAME.py ARGS --markdown
FILE`), one after another so they do not compete for the cores; its report goes into its
own section of the document, with the command, the machine, the load average before and
after, the commit and the wall time. With --only, the other sections are kept as they
are. Nothing is written unless every benchmark that ran succeeded (the document is
replaced atomically); each run's full output is kept under --logs.

    python benchmarks/suite.py                      # all, at the documented sizes
    python benchmarks/suite.py --only mips,rag      # rerun two sections
    python benchmarks/suite.py --quick --output /tmp/b.md   # small sizes: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import machine

from realm_jax.durable import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    script: str
    args: tuple[str, ...]        # the documented run
    quick: tuple[str, ...]       # a small run that exercises the same code
    about: str                   # what is measured and how to read it (no figures)


BENCHMARKS = (
    Benchmark(
        "encoder", "Encoder forward (issue 2)", "bench_encoder.py",
        ("--repeats", "3", "--passages", "300"), ("--repeats", "1", "--passages", "16"),
        "all-MiniLM-L6-v2 (6 layers, 384 wide), the same weights in realm-jax's Flax encoder "
        "and in HF PyTorch `BertModel`: a fixed-shape forward, and real passages of the "
        "Wikipedia sample embedded with length buckets, padded to the maximum length, and "
        "by PyTorch on length-sorted batches (what sentence-transformers does)."),
    Benchmark(
        "corpus_embedding", "Corpus embedding (issue 3)", "bench_corpus_embedding.py",
        ("--limit", "400"), ("--limit", "32", "--repeats", "1"),
        "DPR passages (100 words with their title) of the Wikipedia sample embedded with "
        "all-MiniLM-L6-v2: realm-jax's `embed_corpus` over the block store against HF "
        "PyTorch done the sentence-transformers way, and against PyTorch on the same "
        "pre-tokenized rows (model time only)."),
    Benchmark(
        "mips", "MIPS on 1M vectors (issue 3)", "bench_mips.py",
        ("--n", "1000000"),
        ("--n", "5000", "--queries", "100", "--repeat", "1", "--min_seconds", "0", "--pause", "0",
         "--methods", "numpy,jax,scann"),
        "Clustered unit vectors, queries from the same distribution, top-10, all queries in "
        "one batch on all cores. ScaNN's tree and FAISS's IVF lists train their k-means on "
        "the same vectors (all of them). ScaNN and FAISS are swept over their search knobs "
        "(partitions searched; candidates re-scored exactly, k to 40 k, the same counts for "
        "both); each row is the fastest setting reaching recall@10 >= 0.95, then timed again with "
        "every other row in 3 interleaved rounds (median; 1 s idle before each timing). "
        "Bytes per vector count what the serialized index holds."),
    Benchmark(
        "mips_minilm", "MIPS on real MiniLM embeddings (issue 3)", "bench_mips.py",
        ("--data", "minilm"),
        ("--data", "minilm", "--minilm_limit", "600", "--queries", "50", "--repeat", "1",
         "--min_seconds", "0", "--pause", "0",
         "--methods", "numpy,jax,scann"),
        "Every sentence of the Wikipedia sample embedded by all-MiniLM-L6-v2 (384 wide, unit "
        "norm); held-out sentences are the queries. The same methods and sweep as above. "
        "Here ScaNN's default settings work on the principal components holding 80% of the "
        "variance (reordering full vectors), and FAISS runs once more with the same PCA."),
    Benchmark(
        "rag", "RAG training and decoding (issue 6)", "bench_rag.py", (),
        ("--repeats", "1", "--batch", "2", "--docs", "2", "--context", "16", "--target", "6",
         "--d_model", "64", "--layers", "1", "--vocab", "500", "--max_length", "6"),
        "transformers' PyTorch `RagTokenForGeneration` / `RagSequenceForGeneration` and "
        "realm-jax on the same tiny random weights, contexts and document scores. Model "
        "FLOPs come from XLA's cost analysis of the compiled step; utilization is against "
        "the measured peak of one large float32 matmul on the same device."),
    Benchmark(
        "realm_step", "REALM pre-training step (issue 4)", "bench_realm_step.py",
        ("--steps", "6", "--articles", "10"),
        ("--steps", "1", "--articles", "2", "--sizes", "tiny", "--modes", "device"),
        "The real trainer (`realm_jax.train.trainer.train`) on REALM blocks of the Wikipedia "
        "sample, one index published from the initial document tower, one CPU device. No "
        "peer: there is no maintained PyTorch REALM pre-training implementation."),
    Benchmark(
        "realm_heldout", "REALM pre-training: held-out retrieval utility (issue 4)",
        "realm_heldout.py", ("--steps", "1600", "--eval_every", "400", "--eval_queries", "1000"),
        ("--steps", "2", "--eval_every", "1", "--articles", "2", "--eval_queries", "4"),
        "The demo's REALM configuration trained by the real trainer on the whole Wikipedia "
        "sample against the initial index (no refresher), evaluated on masked sentences of "
        "held-out documents (one per held-out block). The change since step 0 is paired "
        "over the same queries; its standard error treats queries, not tokens, as the "
        "independent draws."),
    Benchmark(
        "realm_heldout_answerable",
        "REALM pre-training on answerable queries only: held-out retrieval utility (issue 4)",
        "realm_heldout.py", ("--steps", "1600", "--eval_every", "400", "--eval_queries", "1000",
                             "--answerable_only"),
        ("--steps", "2", "--eval_every", "1", "--articles", "2", "--eval_queries", "4",
         "--answerable_only"),
        "As above, with `data.answerable_only=True`: the training queries are only the "
        "sentences whose masked span occurs in a block they may read. The held-out queries "
        "and the step-0 evaluation are the same as above."),
    Benchmark(
        "realm_heldout_long",
        "REALM pre-training, twice as long: held-out retrieval utility (issue 4)",
        "realm_heldout.py", ("--steps", "3200", "--eval_every", "800", "--eval_queries", "1000"),
        ("--steps", "2", "--eval_every", "1", "--articles", "2", "--eval_queries", "4"),
        "As `realm_heldout`, with 3200 steps (the learning rate decays over 3200 steps, so "
        "step 1600 here is not step 1600 there). The held-out queries and the step-0 "
        "evaluation are the same."),
    Benchmark(
        "realm_heldout_warm",
        "REALM pre-training from a masked-LM reader: held-out retrieval utility (issue 4)",
        "realm_heldout.py", ("--steps", "1600", "--eval_every", "400", "--eval_queries", "1000",
                             "--reader_warmup", "1000", "--random_blocks", "1"),
        ("--steps", "2", "--eval_every", "1", "--articles", "2", "--eval_queries", "4",
         "--reader_warmup", "2", "--warmup_batch", "2", "--random_blocks", "1"),
        "As `realm_heldout`, but REALM starts from a reader that is already a masked LM, as "
        "REALM's BERT reader is (MiniLM ships no MLM head): first 1000 steps of 8 training "
        "queries train the reader alone with the null document as its only candidate, the "
        "towers frozen; step 0 is the model after them. The held-out queries are the same. "
        "At the end, the first and last steps' models score them again with random blocks "
        "in place of the retrieved candidates."),
    Benchmark(
        "realm_heldout_k8_device",
        "REALM from a masked-LM reader with 8 candidates, the live query tower searching: "
        "held-out retrieval utility and answer recall (issue 4)",
        "realm_heldout.py", ("--steps", "600", "--eval_every", "300", "--eval_queries", "1000",
                             "--reader_warmup", "1000", "--num_candidates", "8",
                             "--mode", "device", "--random_blocks", "1"),
        ("--steps", "2", "--eval_every", "1", "--articles", "2", "--eval_queries", "4",
         "--reader_warmup", "2", "--warmup_batch", "2", "--num_candidates", "4",
         "--mode", "device", "--random_blocks", "1"),
        "As `realm_heldout_warm`, with REALM's 8 candidates (the null document and 7 "
        "retrieved blocks) instead of the demo's 3, for 600 steps, and in device mode: each "
        "step's live query tower searches the step-0 index on the device, so training the "
        "query tower can change what is retrieved. Answer recall: the share of the "
        "answerable held-out queries whose answer one of their retrieved candidates holds. "
        "The random-block control searches with each model's own query tower."),
    Benchmark(
        "realm_step0_utility",
        "REALM held-out retrieval utility at step 0: retrieved against random candidates "
        "(issue 4)",
        "realm_step0_utility.py", (),
        ("--articles", "2", "--eval_queries", "4", "--trials", "1"),
        "The demo's model at initialisation (its reader's MLM head new) scores the held-out "
        "queries of `realm_heldout` with the candidates the initial index retrieves and with "
        "random blocks in their place. Utility that random blocks give as well is not "
        "retrieval's doing."),
    Benchmark(
        "qa_eval", "Open-QA fine-tuning and evaluation (issue 5)", "bench_qa_eval.py",
        ("--questions", "32", "--batch", "16", "--articles", "20"),
        ("--questions", "4", "--batch", "4", "--articles", "2", "--repeats", "1",
         "--train_steps", "1"),
        "ORQA with all-MiniLM-L6-v2 as query tower and reader over REALM blocks of the "
        "Wikipedia sample: the fine-tuning step through the real trainer, and prediction as "
        "`realm-jax eval` runs it (`tasks.orqa.Predictor`) with the split of its time. No "
        "peer: transformers' REALM open-QA model answers one question per call and is in "
        "maintenance mode."),
    Benchmark(
        "corpus_update", "Knowledge update: 1% of the blocks (issue 27)",
        "bench_corpus_update.py", ("--articles", "5"), ("--articles", "1", "--fraction", "0.05"),
        "DPR passages of the Wikipedia sample's first articles, each its own document, "
        "embedded with all-MiniLM-L6-v2 by the refresher: `corpus update` replaces 1% of "
        "the documents, then an incremental refresh (the same tower: only the new blocks "
        "embedded, in a batch fitted to them, the rest reused by id), twice (the second with "
        "the small batch compiled), against a full refresh of the same updated corpus in a "
        "fresh workdir; one refresher and one compiled embedder, as in a long-running "
        "refresher."),
    Benchmark(
        "retriever_step", "DPR training step against sentence-transformers (issue 26)",
        "bench_retriever_step.py", ("throughput", "--batch_size", "16", "--rounds", "3",
                                    "--steps", "2"),
        ("throughput", "--batch_size", "4", "--chunk_size", "2", "--rounds", "1", "--steps",
         "1", "--question_length", "8", "--passage_length", "16"),
        "The trainer's DPR step (in-batch + one hard negative per question, all-MiniLM-L6-v2 "
        "towers, 20 x cosine logits, AdamW), plain and with the gradient cache, against "
        "sentence-transformers' step with `MultipleNegativesRankingLoss` (the same loss) and "
        "`CachedMultipleNegativesRankingLoss` on the same weights and the same full-length "
        "token rows (tokenization left out of both), rounds interleaved; dropout on in all "
        "(training mode)."),
    Benchmark(
        "grad_cache_memory", "Gradient-cache memory against batch size (issue 26)",
        "bench_retriever_step.py", ("memory", "--batch_sizes", "16,64,256,1024"),
        ("memory", "--batch_sizes", "4,8", "--chunk_size", "2", "--question_length", "8",
         "--passage_length", "16"),
        "The trainer's DPR step on all-MiniLM-L6-v2 compiled at growing global batches, "
        "plain and with the gradient cache, and XLA's memory analysis of each compiled step "
        "(deterministic for a jax version; nothing is run)."),
)

INTRO = """\
# Benchmarks

Written by `python benchmarks/suite.py` (`make bench`) from what each script under
`benchmarks/` measured; do not edit by hand. Each candidate runs side by side with the
alternative a user would pick, alternating call by call in one run so that background load
hits both alike: ratios are "realm-jax speed / other speed" and are the figures to read on a
shared machine. Every section names its command, machine, commit and the load average
before and after it ran.
"""

SECTION = re.compile(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->\n", re.S)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "realm_jax", "benchmarks", "configs"],
                               capture_output=True, text=True).stdout.strip()
        return out + (" with local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def run_one(bench: Benchmark, quick: bool, logs: Path) -> tuple[str | None, str]:
    """Run one benchmark; (its section, or None on failure, and a status line)."""
    args = bench.quick if quick else bench.args
    command = ["python", f"benchmarks/{bench.script}", *args]
    with tempfile.NamedTemporaryFile("r", suffix=".md") as report:
        log = logs / f"{bench.name}.log"
        load_before, start = _load(), time.perf_counter()
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, str(HERE / bench.script), *args,
                                   "--markdown", report.name], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            return None, f"{bench.name}: FAILED (exit {done.returncode}), see {log}"
        body = report.read().strip()
    if not body:
        return None, f"{bench.name}: FAILED (no report written), see {log}"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = "\n\n".join([
        f"<!-- bench:{bench.name} -->\n## {bench.title}",
        f"    {shlex.join(command)}",
        bench.about,
        f"*Run {when}, commit {_git_commit()}, {seconds / 60:.1f} min; load average "
        f"{load_before} before, {_load()} after; {machine()}.*",
        body]) + f"\n<!-- /bench:{bench.name} -->\n"
    return section, f"{bench.name}: done in {seconds:.0f} s"


def assemble(sections: dict[str, str], previous: str) -> str:
    """The document: the intro, then one section per benchmark in BENCHMARKS order, new
    ones from `sections`, the others kept from `previous`; then the sections other scripts
    write (benchmarks/accelerator.py), in their previous order, new ones last."""
    kept = {m.group(1): m.group(0) for m in SECTION.finditer(previous)}
    parts = [INTRO]
    for bench in BENCHMARKS:
        section = sections.get(bench.name) or kept.get(bench.name)
        if section:
            parts.append(section)
    known = {bench.name for bench in BENCHMARKS}
    for name in list(kept) + [n for n in sections if n not in kept]:
        if name not in known:
            parts.append(sections.get(name) or kept[name])
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = [b.name for b in BENCHMARKS]
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (a smoke run; do not publish its figures)")
    parser.add_argument("--output", help="the document to rewrite (default: "
                        "docs/benchmarks.md; with --quick, benchmarks.md in the logs folder)")
    parser.add_argument("--logs", default=None, help="folder for each run's output "
                        "(default: a new temporary folder)")
    args = parser.parse_args(argv)
    chosen = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--only: unknown benchmarks {unknown}; choose from {names}")
    logs = Path(args.logs or tempfile.mkdtemp(prefix="realm_jax_bench_"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\nlogs: {logs}", flush=True)

    sections, failed = {}, []
    for bench in BENCHMARKS:
        if bench.name not in chosen:
            continue
        print(f"{bench.name}: running ({bench.script})", flush=True)
        section, status = run_one(bench, args.quick, logs)
        print(status, flush=True)
        if section is None:
            failed.append(bench.name)
        else:
            sections[bench.name] = section
    output = Path(args.output or (logs / "benchmarks.md" if args.quick
                                  else ROOT / "docs" / "benchmarks.md"))
    if failed:
        print(f"not written: {output} is unchanged because {', '.join(failed)} failed",
              file=sys.stderr)
        return 1
    previous = output.read_text() if output.exists() else ""
    atomic_write_text(output, assemble(sections, previous))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
