"""MIPS side by side: exact numpy, exact JAX device search, ScaNN and FAISS.

Corpus: N x D unit vectors (default 1M x 128), clustered (a Gaussian mixture around N/500
random unit directions with noise of norm `--spread`, default 2.0: overlapping clusters;
`--data uniform` for isotropic random vectors, the hardest case), and queries
drawn from the same distribution (not copies of corpus rows). `--data minilm` uses real
embeddings instead: every sentence of the Wikipedia sample shipped in gensim embedded by
all-MiniLM-L6-v2 (384 wide, unit norm), a random `--queries` of them held out as queries.
Ground truth is the exact top-k. ScaNN's tree and FAISS's IVF lists train on the same
vectors (all of them, up to ScaNN's MAX_TRAINING_SAMPLE). ScaNN and FAISS are swept over
their search-time knobs; the table reports, per method, the fastest setting whose recall@k
reaches `--target_recall` (or the best recall reached, marked, if none does); then every
row's setting is timed again in `--rounds` interleaved rounds and its median reported.
Queries are answered in one batch using all cores.

    python benchmarks/bench_mips.py --n 200000
    python benchmarks/bench_mips.py --data minilm
    python benchmarks/bench_mips.py --methods numpy,scann,faiss-ivfpq --verbose

faiss-cpu is a benchmark-only dependency (`pip install faiss-cpu`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np
from common import Report, add_markdown_flag, matmul_peak_flops, minilm_folder, wiki_sample_path

from realm_jax.index import base
from realm_jax.index.scann_searcher import MAX_TRAINING_SAMPLE, ScannSettings

ALL_METHODS = ("numpy", "jax", "scann", "faiss-ivfflat", "faiss-ivfpq", "faiss-ivfpq-pca",
               "faiss-hnsw")
DEFAULT_METHODS = ("numpy", "jax", "scann", "faiss-ivfflat", "faiss-ivfpq", "faiss-ivfpq-pca")
# Fractions of the partitions searched per query in the sweeps (ScaNN's leaves, FAISS's
# lists): steps of about 1.25x up to 5%, about 1.12x beyond, where each step costs most.
SEARCH_FRACTIONS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0065, 0.008, 0.01, 0.0125, 0.016,
                    0.02, 0.025, 0.03, 0.04, 0.05, 0.056, 0.063, 0.071, 0.08, 0.09, 0.1,
                    0.112, 0.125, 0.14, 0.16, 0.18, 0.2, 0.225, 0.25, 0.28, 0.315, 0.355,
                    0.4, 0.45, 0.5)
# Candidates re-scored exactly per query, in multiples of k: ScaNN's reorder and FAISS's
# refine (k_factor) are swept over the same counts.
RERANK_FACTORS = (1, 2, 5, 10, 20, 40)


def partitions_to_search(total: int) -> list[int]:
    """The sweep's counts of partitions searched out of `total` (SEARCH_FRACTIONS)."""
    return sorted({max(1, int(round(total * f))) for f in SEARCH_FRACTIONS})


def make_data(n: int, dim: int, num_queries: int, kind: str, spread: float, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        def draw(m):
            return rng.standard_normal((m, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((max(1, n // 500), dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        def draw(m):
            out = np.empty((m, dim), np.float32)
            for s in range(0, m, 262_144):
                e = min(m, s + 262_144)
                out[s:e] = centres[rng.integers(0, len(centres), e - s)]
                out[s:e] += rng.standard_normal((e - s, dim), dtype=np.float32) * (
                    spread / math.sqrt(dim))
            return out
    corpus, queries = draw(n), draw(num_queries)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return corpus, queries


def minilm_sentences(num_queries: int, limit: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(corpus, queries): MiniLM embeddings of the sample's sentences of at least 5 words
    (the first `limit` if > 0), `num_queries` random ones held out as the queries."""
    from realm_jax import TextEmbedder
    from realm_jax.data.readers import SkipCounter, read_wiki_xml
    from realm_jax.data.spans import split_sentences

    sentences = [doc.text[a:b] for doc in read_wiki_xml(wiki_sample_path(), SkipCounter())
                 for a, b in split_sentences(doc.text) if len(doc.text[a:b].split()) >= 5]
    if limit:
        sentences = sentences[:limit]
    if len(sentences) <= num_queries:
        raise SystemExit(f"--queries {num_queries}: only {len(sentences)} sentences")
    embedder = TextEmbedder.from_hf(minilm_folder(), max_length=128)
    vectors = np.asarray(embedder.embed(sentences, batch_size=64), np.float32)
    order = np.random.default_rng(seed).permutation(len(vectors))
    return vectors[order[num_queries:]], vectors[order[:num_queries]]


def timed(fn: Callable[[], Any], repeat: int = 1, min_seconds: float = 0.0
          ) -> tuple[Any, float]:
    """Result of fn and its best wall time over at least `repeat` runs, repeated until
    `min_seconds` have passed (short searches are noisy: best of many)."""
    best, out, runs, spent = math.inf, None, 0, 0.0
    while runs < repeat or spent < min_seconds:
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        best, runs, spent = min(best, seconds), runs + 1, spent + seconds
    return out, best


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict[str, Any]] = []

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def add(self, method: str, settings: str | Callable[[float], str], build_s: float,
            recall: float, qps: float, bytes_per_vector: float, note: str = "",
            search: Callable[[], Any] | None = None) -> None:
        """One table row; `search` reruns its setting for `retime`, `settings` may be a
        function of the queries/s (a description that quotes the speed)."""
        describe = settings if callable(settings) else (lambda qps, text=settings: text)
        self.rows.append(dict(method=method, settings=describe(qps), build_s=build_s,
                              recall=recall, qps=qps, bytes_per_vector=bytes_per_vector,
                              note=note, search=search, describe=describe))

    def retime(self, rounds: int, num_queries: int) -> None:
        """Time every row's chosen setting again in `rounds` interleaved rounds and keep the
        median: the sweep's best-of-many favours whichever method had more lucky draws, and
        a machine's speed drifts between the methods' sweeps."""
        rows = [r for r in self.rows if r["search"] is not None] if rounds > 0 else []

        def qps(row) -> float:
            # Let the previous method's worker threads go idle first: FAISS's OpenMP threads
            # spin after each call, and slowed a ScaNN search that followed by ~20%.
            time.sleep(self.args.pause)
            return num_queries / timed(row["search"], 1, self.args.min_seconds)[1]
        speeds = [[qps(r) for r in rows] for _ in range(rounds)]
        for row, row_speeds in zip(rows, zip(*speeds)):
            row["sweep_qps"], row["qps"] = row["qps"], float(np.median(row_speeds))
            row["settings"] = row["describe"](row["qps"])
            self.log(f"{row['method']}: {row['sweep_qps']:,.0f} q/s in the sweep, "
                     f"{row['qps']:,.0f} the median of {rounds} rounds")

    def sweep(self, method: str, build_s: float, bytes_per_vector: float,
              configs: list[tuple[str, Callable[[], np.ndarray]]], truth: np.ndarray) -> None:
        """Run each (settings, search) config, cheapest first; keep the fastest one reaching
        the target. Stops once configs run at under half the best good one's speed."""
        q, k, target = len(truth), self.args.k, self.args.target_recall
        results: list[tuple[str, float, float]] = []
        for settings, search in configs:
            ids, seconds = timed(search, self.args.repeat, self.args.min_seconds)
            recall = base.recall_at_k(ids, truth, k)
            results.append((settings, recall, q / seconds))
            if self.args.verbose:
                self.log(f"  {method:14s} {settings:44s} recall {recall:.4f} "
                         f"{q / seconds:10.0f} q/s")
            best_good = max((r[2] for r in results if r[1] >= target), default=None)
            if best_good is not None and q / seconds < best_good / 2:
                break
        good = [r for r in results if r[1] >= target]
        if good:
            settings, recall, qps = max(good, key=lambda r: r[2])
            note = ""
        else:
            settings, recall, qps = max(results, key=lambda r: (r[1], r[2]))
            note = f"recall < {target}"
        self.add(method, settings, build_s, recall, qps, bytes_per_vector, note,
                 search=dict(configs)[settings])


def run_numpy(bench: Bench, corpus, queries, k):
    def search():
        return base.exact_search(queries, corpus, k)
    (scores, ids), seconds = timed(search, bench.args.repeat)
    bench.add("exact numpy", f"float32, blocks of {base.EXACT_BLOCK_ROWS} rows", 0.0, 1.0,
              len(queries) / seconds, corpus.nbytes / len(corpus), search=search)
    return ids


def run_jax(bench: Bench, corpus, queries, truth):
    import jax
    import jax.numpy as jnp
    from realm_jax.index.device import DeviceSearcher
    k = bench.args.k
    dtype = bench.args.jax_dtype
    build = time.perf_counter()
    searcher = DeviceSearcher(corpus, block_size=bench.args.block_size, dtype=dtype)
    searcher.search(queries, k)  # build = placing the shards + compiling for this batch
    build = time.perf_counter() - build

    def search():
        return searcher.search(queries, k)[1]
    ids_found, seconds = timed(search, bench.args.repeat)
    recall = base.recall_at_k(ids_found, truth, k)
    # The roofline of one batch on these devices: the corpus read once (at the speed of a
    # plain jitted read of the same array) or 2 Q N D FLOPs (at the measured matmul peak),
    # whichever takes longer; the row says what fraction of it the search reaches.
    read_all = jax.jit(lambda e: jnp.sum(e, dtype=jnp.float32))
    _, read_s = timed(lambda: read_all(searcher.embeddings).block_until_ready(),
                      bench.args.repeat + 1)
    flops = 2.0 * len(queries) * searcher.size * searcher.dim
    devices = jax.devices()
    peak = matmul_peak_flops() * len(devices)  # the corpus is sharded over all of them
    bound, roofline_s = max((("memory", read_s), ("compute", flops / peak)), key=lambda b: b[1])

    def describe(qps: float) -> str:
        seconds = len(queries) / qps
        return (f"{dtype}, {len(devices)} x {devices[0].platform}, block {searcher.block_size}; "
                f"{flops / seconds / 1e9:.0f} GFLOP/s, "
                f"{searcher.embeddings.nbytes / seconds / 1e9:.1f} GB/s: "
                f"{roofline_s / seconds:.0%} of the {bound}-bound roofline")
    bench.add("exact JAX device search", describe, build, recall, len(queries) / seconds,
              searcher.embeddings.nbytes / searcher.size, search=search)


def run_scann(bench: Bench, corpus, queries, truth):
    from realm_jax.index.scann_searcher import ScannSearcher
    k = bench.args.k
    settings = ScannSettings(num_neighbors=k, num_threads=0, brute_force_below=0)
    searcher, build = timed(lambda: ScannSearcher.build(corpus, settings=settings))
    with tempfile.TemporaryDirectory() as d:
        searcher.serialize(d)
        size = folder_bytes(d)
    leaves = searcher.settings["num_leaves"]
    soar = searcher.settings["soar_lambda"]
    spill = f" (SOAR {soar})" if soar else ""
    dims = searcher.settings["pca_dims"]
    pca = f", PCA to {dims} dims" if dims < corpus.shape[1] else ""
    configs = []
    for n_leaves in partitions_to_search(leaves):
        for reorder in (k * f for f in RERANK_FACTORS):
            configs.append((f"{leaves} leaves{spill}{pca}, search {n_leaves}, reorder {reorder}",
                            lambda n_leaves=n_leaves, reorder=reorder: searcher.search(
                                queries, k, leaves_to_search=n_leaves, reorder=reorder)[1]))
    bench.log(f"scann: built in {build:.1f}s ({searcher.settings})")
    bench.sweep("ScaNN (tree + AH + reorder)", build, size / len(corpus), configs, truth)


def run_faiss(bench: Bench, method: str, corpus, queries, truth):
    import faiss
    k, n, dim = bench.args.k, len(corpus), corpus.shape[1]
    nlist = bench.args.faiss_nlist or max(16, int(round(4 * math.sqrt(n))))
    if method == "faiss-ivfflat":
        spec, label = f"IVF{nlist},Flat", "FAISS IVF-Flat"
    elif method == "faiss-ivfpq":
        spec, label = f"IVF{nlist},PQ{dim // 2}x4fs,RFlat", "FAISS IVF-PQ(4-bit fast scan)+refine"
    elif method == "faiss-ivfpq-pca":
        # The same projection as ScaNN's default (rounded up to an even count for the PQ's
        # 2-dim blocks); the refine re-scores the full vectors, as ScaNN's reorder does.
        dims = ScannSettings().projected_dims(corpus)
        if dims == dim:
            bench.log(f"{method}: skipped, ScaNN's default settings do not project this corpus")
            return
        dims += dims % 2
        spec = f"PCA{dims},IVF{nlist},PQ{dims // 2}x4fs,RFlat"
        label = f"FAISS PCA{dims} + IVF-PQ(4-bit fast scan)+refine"
    else:
        spec, label = "HNSW32,Flat", "FAISS HNSW32"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)

    def build():
        if not index.is_trained:
            # The same training vectors as ScaNN's tree (FAISS's k-means keeps at most 256
            # per list of them).
            m = min(n, MAX_TRAINING_SAMPLE)
            index.train(corpus if m == n else
                        corpus[np.random.default_rng(0).choice(n, m, replace=False)])
        index.add(corpus)
        return index
    _, build_s = timed(build)
    size = faiss.serialize_index(index).nbytes
    bench.log(f"{method}: built in {build_s:.1f}s")

    def search_with(set_params):
        def run():
            set_params()
            return index.search(queries, k)[1].astype(np.int64)
        return run

    configs = []
    if method == "faiss-hnsw":
        for ef in (16, 32, 64, 128, 256, 512, 1024):
            def setp(ef=ef):
                index.hnsw.efSearch = ef
            configs.append((f"efSearch {ef}", search_with(setp)))
    else:
        ivf = faiss.extract_index_ivf(index)
        refine = method != "faiss-ivfflat"
        factors = RERANK_FACTORS if refine else (1,)
        for nprobe in partitions_to_search(nlist):
            for kf in factors:
                def setp(nprobe=nprobe, kf=kf):
                    ivf.nprobe = nprobe
                    if refine:
                        faiss.downcast_index(index).k_factor = kf
                settings = f"nlist {nlist}, nprobe {nprobe}" + (
                    f", k_factor {kf}" if refine else "")
                configs.append((settings, search_with(setp)))
    bench.sweep(label, build_s, size / n, configs, truth)


def table(rows: list[dict[str, Any]], exact_qps: float | None) -> tuple[list[str], list]:
    header = ["method", "settings", "build (s)", "recall@10", "queries/s", "x exact numpy",
              "bytes/vector"]
    out = []
    for r in rows:
        speed = f"{r['qps'] / exact_qps:.1f}x" if exact_qps else "-"
        recall = f"{r['recall']:.3f}" + (f" ({r['note']})" if r["note"] else "")
        out.append((r["method"], r["settings"], f"{r['build_s']:.1f}", recall,
                    f"{r['qps']:,.0f}", speed, f"{r['bytes_per_vector']:.0f}"))
    return header, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus size")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", choices=("clustered", "uniform", "minilm"), default="clustered")
    parser.add_argument("--minilm_limit", type=int, default=0,
                        help="--data minilm: embed only the first N sentences (0: all)")
    parser.add_argument("--spread", type=float, default=2.0,
                        help="clustered data: noise norm relative to the unit centres")
    parser.add_argument("--target_recall", type=float, default=0.95)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    parser.add_argument("--faiss_nlist", type=int, default=0,
                        help="FAISS IVF lists (default 4 sqrt(N), FAISS's rule of thumb)")
    parser.add_argument("--block_size", type=int, default=4096, help="JAX device search")
    parser.add_argument("--jax_dtype", default="float32", help="JAX corpus storage dtype")
    parser.add_argument("--repeat", type=int, default=2, help="timing: best of this many")
    parser.add_argument("--min_seconds", type=float, default=0.5,
                        help="timing: repeat a search until this much time has passed")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing: after the sweeps, every row's setting is timed again in "
                             "this many interleaved rounds and the median reported (0: the "
                             "sweep's best)")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="timing: seconds of idle before each row's timing in the rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print every sweep point")
    add_markdown_flag(parser)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
    if any(m.startswith("faiss") for m in methods) and importlib.util.find_spec("faiss") is None:
        parser.error("--methods: faiss-cpu is not installed (`pip install faiss-cpu`, a "
                     "benchmark-only dependency); or leave the faiss-* methods out")

    bench = Bench(args)
    if args.data == "minilm":
        (corpus, queries), seconds = timed(lambda: minilm_sentences(
            args.queries, args.minilm_limit, args.seed))
        data = "all-MiniLM-L6-v2 embeddings of the Wikipedia sample's sentences"
    else:
        (corpus, queries), seconds = timed(lambda: make_data(
            args.n, args.dim, args.queries, args.data, args.spread, args.seed))
        data = f"{args.data} unit vectors" + (
            f" (spread {args.spread})" if args.data == "clustered" else "")
    bench.log(f"data: {corpus.shape[0]} x {corpus.shape[1]} {data}, {len(queries)} queries "
              f"({seconds:.1f}s)")
    truth = base.exact_search(queries, corpus, args.k)[1]
    for method in methods:
        t = time.perf_counter()
        if method == "numpy":
            run_numpy(bench, corpus, queries, args.k)
        elif method == "jax":
            run_jax(bench, corpus, queries, truth)
        elif method == "scann":
            run_scann(bench, corpus, queries, truth)
        else:
            run_faiss(bench, method, corpus, queries, truth)
        bench.log(f"{method}: done in {time.perf_counter() - t:.1f}s")
    bench.retime(args.rounds, len(queries))
    exact_qps = next((r["qps"] for r in bench.rows if r["method"] == "exact numpy"), None)
    report = Report()
    report.text(f"{corpus.shape[0]:,} x {corpus.shape[1]} {data}; {len(queries)} queries in one "
                f"batch, top-{args.k}, {os.cpu_count()} CPU cores; ScaNN and FAISS: the fastest "
                f"setting with recall@{args.k} >= {args.target_recall} in the sweep"
                + (f"; every row's queries/s is the median of {args.rounds} interleaved rounds "
                   f"after the sweeps." if args.rounds else "."))
    report.table(*table(bench.rows, exact_qps), numeric_from=2)
    fastest = {r["method"]: r["qps"] for r in bench.rows if not r["note"]}
    scann = fastest.get("ScaNN (tree + AH + reorder)")
    if scann and "exact JAX device search" in fastest:
        report.aim("ScaNN queries/s against the exact device search:",
                   scann / fastest["exact JAX device search"], 10)
    faiss = [q for m, q in fastest.items() if m.startswith("FAISS")]
    if scann and faiss:
        report.aim("ScaNN queries/s against FAISS's fastest at the same recall:",
                   scann / max(faiss), 1)
    report.emit(args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            rows = [{k: v for k, v in r.items() if not callable(v)} for r in bench.rows]
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
