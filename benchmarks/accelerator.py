"""The accelerator check: what realm-jax does on one GPU or TPU chip, in one short run.

On whatever JAX backend it finds, one table:

  - the REALM train step at BERT-base sizes (the paper config's bfloat16 compute, scanned
    layers and remat), `scann` and `device` retrieval modes, the latter over an on-device
    corpus of REALM's size: seconds per step, model FLOP/s and MFU against the chip's peak
    dense bfloat16 rate (model FLOPs counted from the shapes: fwd + bwd = 3 x fwd, remat's
    recomputation not counted);
  - encoder forward (BERT-base, batch 128 x 288): tokens/s with each attention
    implementation (`EncoderConfig.attention`: einsum, jax.nn.dot_product_attention's xla
    path, and its cudnn path on NVIDIA GPUs) against HF PyTorch `BertModel` (SDPA) on the
    same weights;
  - corpus embedding of REALM blocks (288 wordpieces + [CLS] [SEP]) with the REALM document
    tower through `CorpusEmbedder.embed_blocks`, against PyTorch on the same weights and
    rows; from it, the time to re-embed REALM's 13.35M blocks on 1 and on 8 chips;
  - exact MIPS on the device (`device_topk`) over 13.35M x 128 embeddings: queries/s at a
    batch of 1024 and at REALM's per-step batch, top-8, bfloat16 and float32 corpora, and
    the corpus-read bandwidth as a fraction of the chip's memory bandwidth;
  - the RAG-Token train step at the paper's shapes (DPR BERT-base question encoder,
    BART-large generator, 5 documents of 300 tokens, 40 target tokens) against
    transformers' `RagTokenForGeneration` (bfloat16 autocast, fused AdamW) on the same
    weights: steps/s.

PyTorch runs on the GPU when torch sees one, else on the CPU. Each measurement is timed
after warm-up (its compilation) as the median of several calls, PyTorch and JAX
alternating; each runs in its own try (a failure becomes an error row) and none starts
once it would overrun --budget_s. The table is printed as each row arrives and, with --out
DIR, rewritten there (accelerator.md, results.json) after every measurement, so a run cut
short keeps what it measured.

    python benchmarks/accelerator.py --out $OUT              # one GPU or TPU chip, ~8 min
    python benchmarks/accelerator.py --tiny                  # toy sizes on a CPU, < 1 min
    python benchmarks/accelerator.py --only mips,rag         # a subset
    python benchmarks/accelerator.py --write_docs            # also replace its section of
                                                             # docs/benchmarks.md

JAX memory: unless already set, XLA_PYTHON_CLIENT_PREALLOCATE=false and
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6, so that PyTorch, in the same process, has the rest of
the GPU (see docs/accelerators.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from common import Report, alternate, machine, matmul_peak_flops, median_seconds

ROOT = Path(__file__).resolve().parent.parent
SECTION = "accelerator"
REALM_CORPUS_ROWS = 13_353_718      # REALM's Wikipedia blocks (realm_jax.aot's default too)
MEMORY_FLAGS = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}
# device_kind (substring, first match) -> (peak dense bfloat16 FLOP/s, memory bytes/s).
PEAKS = (("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12), ("H200", 989e12, 4.8e12),
         ("A100", 312e12, 2.0e12), ("TPU v5 lite", 197e12, 819e9), ("TPU v5", 459e12, 2.765e12),
         ("TPU v6 lite", 918e12, 1.64e12), ("TPU v4", 275e12, 1.2e12))
TINY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                  "--xla_force_host_platform_device_count=1")
MEASUREMENTS = ("mips", "encoder", "corpus_embedding", "realm_scann", "realm_device", "rag")


# ---------------------------------------------------------------------------------------
# The project's pieces this check drives. realm_jax.train is being reorganised: these are
# the only names taken from it (and from the configs), all here.

def project_parts():
    """The REALM and RAG step builders and the paper configs' names."""
    import types

    from realm_jax import models, sharding
    from realm_jax.data.realm_examples import SpecialIds
    from realm_jax.tasks import rag, realm
    from realm_jax.train.optim import make_optimizer
    from realm_jax.train.state import create_state, state_shardings
    from realm_jax.train.trainer import jit_train_step

    return types.SimpleNamespace(
        realm=realm, jit_train_step=jit_train_step, make_optimizer=make_optimizer,
        state_shardings=state_shardings, create_state=create_state, SpecialIds=SpecialIds,
        part_shardings=sharding.part_shardings, abstract_params=models.abstract_params,
        RagLossFn=rag.RagLossFn, rag_key=rag.MODEL_KEY, realm_config="realm",
        rag_config="rag")


# ---------------------------------------------------------------------------------------
# Sizes

@dataclasses.dataclass(frozen=True)
class Sizes:
    realm_batch: int                 # REALM queries per step (x num_candidates reader rows)
    realm_overrides: tuple = ()      # config overrides on top of the paper config
    corpus_rows: int = REALM_CORPUS_ROWS
    encoder_batch: int = 128
    encoder_length: int = 288
    embed_docs: int = 16384
    embed_batch: int = 256
    mips_queries: tuple = (1024, 0)  # 0: the REALM step's batch
    top_k: int = 8
    rag_batch: int = 8
    rag_overrides: tuple = ()
    repeats: int = 5
    # Seconds each measurement may take on one H100 (the budget check's guess).
    estimates: tuple = (("mips", 30), ("encoder", 45), ("corpus_embedding", 40),
                        ("realm_scann", 80), ("realm_device", 90), ("rag", 120))


PAPER = Sizes(realm_batch=32)
# Toy sizes; float32, layers unrolled and kept (the cheapest to compile on a CPU: the
# bfloat16, scan and remat paths are the same code, tested elsewhere).
_TINY_ENCODER = ("vocab_size=128", "hidden_size=32", "num_layers=1", "num_heads=4",
                 "intermediate_size=64", "max_position_embeddings=64", "dtype=float32",
                 "scan_layers=False", "remat=False")
TINY = Sizes(
    realm_batch=2,
    realm_overrides=tuple(f"model.encoder.{o}" for o in _TINY_ENCODER) + (
        "model.retriever_proj_size=16", "retrieval.num_candidates=3",
        "retrieval.query_length=16", "retrieval.block_length=24", "retrieval.exclude_slack=2"),
    corpus_rows=4096, encoder_batch=4, encoder_length=24, embed_docs=64, embed_batch=16,
    mips_queries=(64, 0), rag_batch=2,
    rag_overrides=tuple(f"model.question_encoder.{o}" for o in _TINY_ENCODER) + (
        "model.generator.vocab_size=128", "model.generator.d_model=32",
        "model.generator.encoder_layers=1", "model.generator.decoder_layers=1",
        "model.generator.encoder_attention_heads=4", "model.generator.decoder_attention_heads=4",
        "model.generator.encoder_ffn_dim=64", "model.generator.decoder_ffn_dim=64",
        "model.generator.max_position_embeddings=64", "model.generator.dtype=float32",
        "model.generator.scan_layers=False", "model.generator.remat=False", "rag.n_docs=2",
        "rag.max_source_length=8", "rag.max_combined_length=16", "rag.max_target_length=6"),
    repeats=2,
    estimates=tuple((name, 5) for name in MEASUREMENTS))


# ---------------------------------------------------------------------------------------
# Results

@dataclasses.dataclass
class Row:
    key: str
    measurement: str
    unit: str
    value: float | None = None        # realm-jax
    reference: float | None = None    # PyTorch, when there is a peer
    utilization: float | None = None  # of the chip's peak (FLOP/s or memory bandwidth)
    higher_is_better: bool = True
    note: str = ""
    error: str = ""

    @property
    def ratio(self) -> float | None:
        """realm-jax speed / PyTorch speed."""
        if not self.value or not self.reference:
            return None
        return (self.value / self.reference if self.higher_is_better
                else self.reference / self.value)

    def cells(self) -> list[str]:
        if self.error:
            return [self.measurement, self.unit, f"**{self.error}**", "", "", "", ""]
        fmt = lambda v: "" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}")  # noqa
        return [self.measurement, self.unit, fmt(self.value), fmt(self.reference),
                "" if self.ratio is None else f"{self.ratio:.2f}x",
                "" if self.utilization is None else f"{self.utilization:.1%}", self.note]


@dataclasses.dataclass
class Device:
    platform: str
    kind: str
    count: int
    peak_flops: float
    peak_bandwidth: float
    peak_source: str
    torch_device: str


class Check:
    """Runs measurements in order within a time budget; every outcome becomes rows."""

    def __init__(self, sizes: Sizes, device: Device, budget_s: float, out: Path | None,
                 tiny: bool, command: str):
        self.sizes, self.device, self.budget_s, self.out = sizes, device, budget_s, out
        self.tiny, self.command = tiny, command
        self.start = time.monotonic()
        self.rows: list[Row] = []
        self.context: dict = {}      # what later measurements derive from earlier ones

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self, name: str, label: str, fn: Callable[["Check"], list[Row]]) -> None:
        need = dict(self.sizes.estimates).get(name, 60)
        if self.elapsed() + need > self.budget_s:
            self.add([Row(name, label, "", error=f"skipped: {self.budget_s - self.elapsed():.0f}"
                          f" s of the budget left, needs ~{need} s (rerun with --only {name})")])
            return
        print(f"[{self.elapsed():5.0f} s] {name}: {label}", flush=True)
        t0, cpu0 = time.monotonic(), time.process_time()
        try:
            rows = fn(self)
        except Exception as e:  # the run goes on; the table says what failed
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:160]
            rows = [Row(name, label, "", error=f"error: {type(e).__name__}: {first}")]
        last = rows[-1]
        last.note = "; ".join(x for x in (last.note, f"{time.monotonic() - t0:.0f} s in all") if x)
        print(f"  ({time.process_time() - cpu0:.0f} s of CPU time)", flush=True)
        self.add(rows)
        _release_memory()

    def add(self, rows: list[Row]) -> None:
        self.rows.extend(rows)
        for row in rows:
            print("  " + " | ".join(c for c in row.cells() if c), flush=True)
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "accelerator.md").write_text(self.section())
            (self.out / "results.json").write_text(json.dumps(self.as_dict(), indent=2))

    def as_dict(self) -> dict:
        return {"device": dataclasses.asdict(self.device), "tiny": self.tiny,
                "elapsed_s": self.elapsed(), "machine": machine(),
                "rows": [dict(dataclasses.asdict(r), ratio=r.ratio) for r in self.rows]}

    def report(self) -> str:
        d, s = self.device, self.sizes
        report = Report()
        report.text(
            f"{d.count} x {d.kind} ({d.platform}); peaks: {d.peak_flops / 1e12:.3g} TFLOP/s "
            f"dense matmul, {d.peak_bandwidth / 1e9:,.3g} GB/s memory ({d.peak_source}). "
            f"PyTorch on {d.torch_device}. Median of {s.repeats} calls after warm-up; "
            f"realm-jax and PyTorch alternating.")
        report.table(["measurement", "unit", "realm-jax", "PyTorch", "ratio", "of peak",
                      "notes"], [r.cells() for r in self.rows], numeric_from=2)
        report.text("ratio: realm-jax speed / PyTorch speed. of peak: model FLOP/s (MFU) or "
                    "corpus bytes read per second against the chip's peak. " + _aims(self.rows))
        return report.markdown()

    def section(self) -> str:
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        title = f"Accelerator check on {self.device.kind}" + (" (tiny sizes)" if self.tiny else "")
        return "\n\n".join([
            f"<!-- bench:{SECTION} -->\n## {title}", f"    {self.command}",
            f"*Run {when}, {self.elapsed() / 60:.1f} min; {machine()}.*",
            self.report().strip()]) + f"\n<!-- /bench:{SECTION} -->\n"


def _aims(rows: list[Row]) -> str:
    """The issue's aims, and whether this run met them."""
    by_key = {r.key: r for r in rows if not r.error}
    said = []
    for key, what, value, target in (
            ("realm_scann_flops", "REALM step MFU (scann)", "utilization", 0.40),
            ("realm_device_flops", "REALM step MFU (device)", "utilization", 0.40),
            ("mips_bfloat16_step", "device MIPS at the step's batch, share of memory "
             "bandwidth", "utilization", 0.70),
            ("encoder_cudnn", "encoder forward (cudnn) vs PyTorch", "ratio", 1.2),
            ("encoder_xla", "encoder forward (xla) vs PyTorch", "ratio", 1.2),
            ("rag_token_step", "RAG-Token step vs PyTorch", "ratio", 1.2)):
        if key in by_key and getattr(by_key[key], value) is not None:
            got = getattr(by_key[key], value)
            verdict = "met" if got >= target else "not met"
            if value == "utilization":
                said.append(f"{what} >= {target:.0%}: {got:.0%}, {verdict}")
            else:
                said.append(f"{what} >= {target:g}x: {got:.2f}x, {verdict}")
    return ("Aims: " + "; ".join(said) + ".") if said else ""


def _release_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------
# The device

def describe_device(args, tiny: bool) -> Device:
    import jax
    import jax.numpy as jnp
    import torch

    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform != "cpu" else f"CPU ({machine().split(';')[0]})"
    flops = bandwidth = None
    source = "flags"
    for name, f, b in PEAKS:
        if name in dev.device_kind:
            flops, bandwidth, source = f, b, "datasheet"
            break
    if args.peak_tflops:
        flops, source = args.peak_tflops * 1e12, "flags"
    if args.peak_bandwidth_gbs:
        bandwidth, source = args.peak_bandwidth_gbs * 1e9, "flags"
    if flops is None:
        flops = matmul_peak_flops(512 if tiny else 4096,
                                  "float32" if dev.platform == "cpu" else "bfloat16", 3)
        source = "measured: one large matmul, one large copy"
    if bandwidth is None:
        x = jnp.ones((1 << (22 if tiny else 28),), jnp.float32)
        copy = jax.jit(lambda a: a + 1)
        bandwidth = 2 * x.nbytes / median_seconds(lambda: copy(x), 3)
        source = "measured: one large matmul, one large copy"
    if tiny:
        torch.set_num_threads(1)  # toy sizes: threads would only wait for each other
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch_device == "cuda":
        torch_device += f" ({torch.cuda.get_device_name(0)})"
    return Device(dev.platform, kind, jax.device_count(), float(flops), float(bandwidth),
                  source, torch_device)


def _on_gpu(check: Check) -> bool:
    return check.device.platform == "gpu"


def _torch_env(check: Check):
    """(torch, device, autocast context factory, synchronize)."""
    import contextlib

    import torch
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    def autocast():
        return (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    return torch, device, autocast, sync


# ---------------------------------------------------------------------------------------
# Configs and FLOPs

def realm_config(sizes: Sizes, mode: str):
    from realm_jax import config as config_lib
    from realm_jax.index.device import block_size_for

    config = config_lib.load_config(project_parts().realm_config, *sizes.realm_overrides,
                                    f"retrieval.mode={mode}",
                                    f"train.batch_size={sizes.realm_batch}")
    config.retrieval.search_block_size = block_size_for(sizes.realm_batch)
    return config


def encoder_flops(cfg, sequences: int, length: int) -> float:
    """Forward matmul FLOPs of a BERT-layout encoder over `sequences` x `length` tokens:
    projections and feed-forward (2 x params x tokens) and attention (4 x T^2 x D a layer),
    plus the pooler."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    layer = 2 * length * (4 * d * d + 2 * d * f) + 4 * length * length * d
    return sequences * (cfg.num_layers * layer + (2 * d * d if cfg.add_pooler else 0))


def tower_flops(cfg, sequences: int, length: int) -> float:
    """An Embedder: its encoder, then the projection."""
    projection = 2 * cfg.encoder.hidden_size * cfg.projection_dim if cfg.projection_dim else 0
    return encoder_flops(cfg.encoder, sequences, length) + sequences * projection


def realm_step_flops(configs: dict, batch: int, rc) -> float:
    """Model FLOPs of one REALM step: query tower over B queries, document tower over the
    B x K candidates ([CLS] block [SEP]), the reader over B x K query + block rows and its
    MLM head at the masked positions, all three trained (3 x forward); in device mode the
    search's own query-tower forward too (the search's inner products are not counted)."""
    k, q, c, m = rc.num_candidates, rc.query_length, rc.block_length, rc.max_mask_tokens
    reader = configs["reader"].encoder
    head = 2 * reader.hidden_size * (reader.hidden_size + reader.vocab_size)
    forward = (tower_flops(configs["query_tower"], batch, q)
               + tower_flops(configs["doc_tower"], batch * k, c + 2)
               + encoder_flops(reader.replace(add_pooler=False), batch * k, q + c)
               + batch * k * m * head)
    search = tower_flops(configs["query_tower"], batch, q) if rc.mode == "device" else 0
    return 3 * forward + search


# ---------------------------------------------------------------------------------------
# Measurements

def measure_mips(check: Check) -> list[Row]:
    """Exact top-k on the device over a REALM-sized corpus made on the device."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax import lax

    from realm_jax.index.device import block_size_for, device_topk

    s = check.sizes
    n, dim, rows = s.corpus_rows, 128, []
    batches = [q or s.realm_batch for q in s.mips_queries]
    for dtype in ("bfloat16", "float32"):
        itemsize = jnp.dtype(dtype).itemsize
        if _on_gpu(check) and not _fits(check, n * dim * itemsize * 1.2):
            rows.append(Row(f"mips_{dtype}", f"device MIPS, {dtype} corpus", "queries/s",
                            error="skipped: does not fit in free device memory"))
            continue
        corpus = jax.jit(lambda key, d=dtype: jax.random.normal(key, (n, dim), d))(
            jax.random.key(0))
        for q in batches:
            block = block_size_for(q)
            queries = jax.random.normal(jax.random.key(q), (q, dim), jnp.float32)
            precisions = [("HIGHEST", lax.Precision.HIGHEST)]
            if dtype == "bfloat16" and q == batches[0]:
                precisions.append(("DEFAULT", lax.Precision.DEFAULT))
            for pname, precision in precisions:
                search = jax.jit(functools.partial(device_topk, k=s.top_k, block_size=block,
                                                   num_valid=n, precision=precision))
                seconds = median_seconds(lambda f=search, x=queries, c=corpus: f(x, c),
                                         s.repeats)
                read = n * dim * itemsize / seconds
                suffix = "" if pname == "HIGHEST" else "_default"
                rows.append(Row(
                    f"mips_{dtype}_{'batch' if q == batches[0] else 'step'}{suffix}",
                    f"device MIPS {n:,} x {dim} {dtype}, {q} queries, top-{s.top_k}"
                    + ("" if pname == "HIGHEST" else ", default matmul precision"),
                    "queries/s", q / seconds, utilization=read / check.device.peak_bandwidth,
                    note=f"block {min(block, n)}; corpus read {read / 1e9:,.3g} GB/s; "
                         f"{seconds * 1e3:.1f} ms a batch"))
        corpus = None  # freed before the next dtype's corpus is made
    return rows


def _fits(check: Check, nbytes: float) -> bool:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit is None or nbytes <= limit - stats.get("bytes_in_use", 0)


def _random_params(cfg, seed: int = 0):
    """Parameters of `cfg.module()`, initialised on the default device."""
    import jax
    from flax import linen as nn

    module = cfg.module()
    init = jax.jit(lambda key: nn.unbox(module.init(key, **cfg.example_inputs()))["params"])
    return init(jax.random.key(seed))


def measure_encoder(check: Check) -> list[Row]:
    """BERT-base forward tokens/s by attention implementation, against HF PyTorch."""
    import jax
    import numpy as np
    import transformers

    from realm_jax import hf
    from realm_jax.config import encoder_config

    s = check.sizes
    torch, device, autocast, sync = _torch_env(check)
    cfg = encoder_config(realm_config(s, "scann").model.encoder)
    params = _random_params(cfg)
    folder = Path(tempfile.mkdtemp(prefix="accel_bert_"))
    hf.save(folder, cfg, params)
    model = transformers.BertModel.from_pretrained(folder, attn_implementation="sdpa")
    model = model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()

    rng = np.random.default_rng(0)
    ids = rng.integers(1000 % cfg.vocab_size, cfg.vocab_size,
                       (s.encoder_batch, s.encoder_length)).astype(np.int32)
    mask = np.ones_like(ids)
    ids_d, mask_d = jax.device_put(ids), jax.device_put(mask)
    t_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    t_mask = torch.from_numpy(mask.astype(np.int64)).to(device)

    implementations = ["einsum", "xla"] + (["cudnn"] if _on_gpu(check) else [])
    fns, rows, outputs = {}, [], {}
    for name in implementations:
        module = cfg.replace(attention=name).module()
        forward = jax.jit(lambda p, i, m, module=module: module.apply({"params": p}, i, m)[0])
        try:
            outputs[name] = np.asarray(forward(params, ids_d, mask_d), np.float32)
        except Exception as e:  # e.g. cuDNN refusing a shape: the others still run
            rows.append(Row(f"encoder_{name}", f"encoder forward, attention={name}", "tokens/s",
                            error=f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        fns[name] = lambda f=forward: f(params, ids_d, mask_d)

    def run_torch():
        with torch.inference_mode():
            out = model(t_ids, attention_mask=t_mask).last_hidden_state
        sync()
        return out

    reference = run_torch().float().cpu().numpy()
    fns["torch"] = run_torch
    seconds = alternate(fns, s.repeats)
    tokens = s.encoder_batch * s.encoder_length
    for name in implementations:
        if name not in fns:
            continue
        diff = np.linalg.norm(outputs[name] - reference) / np.linalg.norm(reference)
        rows.append(Row(f"encoder_{name}", f"encoder forward {s.encoder_batch} x "
                        f"{s.encoder_length}, attention={name}", "tokens/s",
                        tokens / seconds[name], tokens / seconds["torch"],
                        note=f"relative difference to PyTorch {diff:.1e}"))
    return sorted(rows, key=lambda r: implementations.index(r.key.split("_", 1)[1]))


def measure_corpus_embedding(check: Check) -> list[Row]:
    """REALM's document tower over full 288-token blocks: `CorpusEmbedder.embed_blocks` on a
    block store, against PyTorch on the same rows (BertModel, pooler, projection)."""
    import numpy as np
    import transformers

    from realm_jax import hf
    from realm_jax.data.store import BlockStore, BlockStoreWriter
    from realm_jax.index.embed_corpus import CorpusEmbedder, RowBuilder

    s = check.sizes
    torch, device, autocast, sync = _torch_env(check)
    config = realm_config(s, "scann")
    cfg = project_parts().realm.model_configs(config)["doc_tower"]
    length = config.retrieval.block_length
    params = _random_params(cfg, 1)

    # A block store of random full blocks ([CLS] block [SEP] rows, no titles).
    root = Path(tempfile.mkdtemp(prefix="accel_store_"))
    rng = np.random.default_rng(0)
    vocab = cfg.encoder.vocab_size
    with BlockStoreWriter(root / "store", token_dtype=np.uint16 if vocab < 65536 else np.int32,
                          settings={"mode": "realm"}) as writer:
        for i in range(s.embed_docs):
            writer.add(rng.integers(104 % vocab, vocab, length), doc_id=str(i), title="",
                       text="", spans=[], doc_index=i)
        writer.finish()
    store = BlockStore.open(root / "store")
    rows = RowBuilder(store, cls_id=101 % vocab, sep_id=102 % vocab, with_title=False,
                      max_length=length + 2)
    ids = np.arange(len(store))
    embedder = CorpusEmbedder(cfg, batch_size=s.embed_batch, dtype="float16")
    placed = embedder.place(params)
    ours = {}

    def run_ours():
        ours["emb"] = embedder.embed_blocks(placed, rows, ids)

    # PyTorch: BertModel with the pooler, then the projection and its LayerNorm.
    folder = root / "bert"
    hf.save(folder, cfg.encoder, params["encoder"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bert = transformers.BertModel.from_pretrained(folder, attn_implementation="sdpa")
    bert = bert.to(device, dtype).eval()
    proj = torch.nn.Linear(cfg.encoder.hidden_size, cfg.projection_dim)
    norm = torch.nn.LayerNorm(cfg.projection_dim, eps=cfg.encoder.layer_norm_eps)
    tensor = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731 (a copy)
    with torch.no_grad():
        proj.weight.copy_(tensor(params["projection"]["kernel"]).T)
        proj.bias.copy_(tensor(params["projection"]["bias"]))
        norm.weight.copy_(tensor(params["projection_ln"]["scale"]))
        norm.bias.copy_(tensor(params["projection_ln"]["bias"]))
    proj, norm = proj.to(device, dtype).eval(), norm.to(device).eval()
    tokens = np.stack(rows.rows(ids)).astype(np.int64)
    per_chip = s.embed_batch // len(embedder.mesh.devices.flat)   # PyTorch: one chip
    theirs = {}

    def run_torch():
        out = np.zeros((len(ids), cfg.projection_dim), np.float16)
        with torch.inference_mode():
            for i in range(0, len(ids), per_chip):
                batch = torch.from_numpy(tokens[i:i + per_chip]).to(device)
                pooled = bert(batch, attention_mask=torch.ones_like(batch)).pooler_output
                emb = norm(proj(pooled).float())
                out[i:i + per_chip] = emb.half().cpu().numpy()
        theirs["emb"] = out

    seconds = alternate({"ours": run_ours, "torch": run_torch}, max(2, s.repeats // 2))
    a, b = ours["emb"].astype(np.float32), theirs["emb"].astype(np.float32)
    cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    # Per chip: CorpusEmbedder shards its batches over all local devices.
    rate = len(ids) / seconds["ours"] / len(embedder.mesh.devices.flat)
    rate_torch = len(ids) / seconds["torch"]
    check.context["embed_docs_per_s"] = (rate, rate_torch)
    hours = lambda r, chips: REALM_CORPUS_ROWS / r / chips / 3600  # noqa: E731
    return [
        Row("corpus_embedding", f"embed {len(ids):,} REALM blocks ({length} + 2 tokens), "
            f"doc tower, batch {per_chip} a chip", "docs/s", rate, rate_torch,
            note=f"lowest cosine to PyTorch {cosine.min():.4f}"),
        Row("reembed_1", f"re-embed REALM's {REALM_CORPUS_ROWS:,} blocks on 1 chip (on paper)",
            "hours", hours(rate, 1), hours(rate_torch, 1), higher_is_better=False),
        Row("reembed_8", f"re-embed REALM's {REALM_CORPUS_ROWS:,} blocks on 8 chips (on paper)",
            "hours", hours(rate, 8), hours(rate_torch, 8), higher_is_better=False,
            note="linear scaling assumed"),
    ]


def _realm_batch(shapes: dict, vocab: int, rc, corpus_rows: int, seed: int = 0) -> dict:
    """Random arrays of the step's batch shapes: full queries and candidate blocks, the
    null document first, every masked slot used."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if shape.dtype == np.bool_:
            out[name] = np.ones(shape.shape, bool)
        elif name == "attention_mask":
            out[name] = np.ones(shape.shape, np.int32)
        elif name == "mask_positions":
            out[name] = rng.integers(1, rc.query_length - 1, shape.shape).astype(np.int32)
        elif name in ("block_id", "doc_index", "cand_ids"):
            out[name] = rng.integers(0, corpus_rows, shape.shape).astype(np.int32)
        elif name == "cand_lengths":
            out[name] = np.full(shape.shape, rc.block_length, np.int32)
        else:
            out[name] = rng.integers(104 % vocab, vocab, shape.shape).astype(np.int32)
    if "cand_ids" in out:
        out["cand_ids"][:, 0] = -1
        out["cand_lengths"][:, 0] = 0
    return out


def _device_corpus(shapes: dict, vocab: int, seed: int = 0) -> dict:
    """The device mode's corpus arrays, made on the devices: random embeddings, full blocks
    of made-up tokens, four blocks a document."""
    import jax
    import jax.numpy as jnp

    def make(key):
        emb = shapes["embeddings"]
        rows, length = shapes["tokens"].shape
        row = jax.lax.broadcasted_iota(jnp.int32, (rows, length), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (rows, length), 1)
        return {"embeddings": jax.random.normal(key, emb.shape, emb.dtype),
                "tokens": 104 % vocab + ((row % 65521) * 7919 + col * 104729)
                % (vocab - 104 % vocab),
                "lengths": jnp.full((rows,), length, jnp.int32),
                "doc_index": jnp.arange(rows, dtype=jnp.int32) // 4}

    out_shardings = {k: v.sharding for k, v in shapes.items()}
    return jax.jit(make, out_shardings=out_shardings)(jax.random.key(seed))


def measure_realm(mode: str) -> Callable[[Check], list[Row]]:
    def measure(check: Check) -> list[Row]:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        from realm_jax import sharding

        s, parts = check.sizes, project_parts()
        config = realm_config(s, mode)
        rc, realm = config.retrieval, parts.realm
        mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
        configs, host_params = realm.build_models(config)
        optimizer = parts.make_optimizer(config.train)
        shardings = parts.state_shardings(
            optimizer, {part: parts.abstract_params(c) for part, c in configs.items()},
            parts.part_shardings(configs, mesh, rules), mesh)
        state = parts.create_state(optimizer, sharding.place(host_params, shardings.params),
                                   shardings)
        del host_params
        vocab = configs["reader"].encoder.vocab_size
        batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        batch = _realm_batch(realm.batch_shapes(s.realm_batch, rc), vocab, rc, s.corpus_rows)
        batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        corpus = corpus_shardings = None
        if mode == "device":
            shapes = realm.device_corpus_shapes(
                s.corpus_rows, configs["doc_tower"].output_dim, "bfloat16", rc.block_length,
                mesh, rc.search_block_size)
            corpus = _device_corpus(shapes, vocab)
            corpus_shardings = {k: v.sharding for k, v in shapes.items()}
        special = parts.SpecialIds(cls=101 % vocab, sep=102 % vocab, mask=103 % vocab, pad=0)
        loss_fn = realm.RealmLossFn.from_config(rc, configs, special,
                                                num_valid=s.corpus_rows if corpus else 0)
        step = parts.jit_train_step(loss_fn.train_loss, optimizer, shardings, batch_sharding,
                                    corpus_shardings)
        rng = jax.random.key(0)
        with sharding.activate(mesh, rules):
            t0 = time.perf_counter()
            compiled = step.lower(state, batch, corpus, rng).compile()
            compile_s = time.perf_counter() - t0
            holder = {"state": state}
            del state

            def run():
                holder["state"], metrics = compiled(holder["state"], batch, corpus, rng)
                return metrics["loss"]

            seconds = median_seconds(run, s.repeats)
        flops = realm_step_flops(configs, s.realm_batch, rc) / jax.device_count()
        enc = configs["reader"].encoder
        what = (f"REALM train step, {mode} mode, batch {s.realm_batch} x "
                f"{rc.num_candidates} candidates")
        note = (f"{enc.dtype}, remat={enc.remat}, scan={enc.scan_layers}, "
                f"attention={enc.attention}; compile {compile_s:.0f} s")
        if mode == "device":
            note += f"; {s.corpus_rows:,}-block corpus on the device, search block " \
                    f"{rc.search_block_size}"
        return [Row(f"realm_{mode}_step", what, "s/step", seconds, higher_is_better=False,
                    note=note),
                Row(f"realm_{mode}_flops", f"{what}: model FLOP/s", "TFLOP/s",
                    flops / seconds / 1e12, utilization=flops / seconds / check.device.peak_flops,
                    note=f"{flops / 1e12:.3g} TFLOP a step")]
    return measure


def measure_rag(check: Check) -> list[Row]:
    """The RAG-Token train step against transformers' RagTokenForGeneration."""
    import jax
    import numpy as np
    import transformers

    from realm_jax import config as config_lib
    from realm_jax import hf, sharding
    from realm_jax.models import EmbedderConfig, RagConfig

    s, parts = check.sizes, project_parts()
    torch, device, autocast, sync = _torch_env(check)
    config = config_lib.load_config(parts.rag_config, *s.rag_overrides)
    rc, m = config.rag, config.model
    g_cfg = config_lib.bart_config(m.generator)
    cfg = RagConfig(EmbedderConfig(config_lib.encoder_config(m.question_encoder), pooling="cls"),
                    g_cfg, n_docs=rc.n_docs, max_combined_length=rc.max_combined_length,
                    forced_bos_token_id=g_cfg.bos_token_id,
                    forced_eos_token_id=g_cfg.eos_token_id)
    params = _random_params(cfg, 2)
    folder = Path(tempfile.mkdtemp(prefix="accel_rag_")) / "rag"
    hf.save(folder, cfg, params)

    b, k = s.rag_batch, rc.n_docs
    q_len, c_len, t_len = rc.max_source_length, rc.max_combined_length, rc.max_target_length
    rng = np.random.default_rng(0)
    q_vocab, g_vocab = cfg.question_encoder.encoder.vocab_size, g_cfg.vocab_size
    labels = rng.integers(3, g_vocab, (b, t_len)).astype(np.int32)
    labels[:, 0], labels[:, -1] = g_cfg.bos_token_id, g_cfg.eos_token_id
    decoder_inputs = np.concatenate(
        [np.full((b, 1), g_cfg.decoder_start_token_id, np.int32), labels[:, :-1]], axis=1)
    host = dict(question_ids=rng.integers(104 % q_vocab, q_vocab, (b, q_len)).astype(np.int32),
                question_mask=np.ones((b, q_len), np.int32),
                doc_embeddings=rng.normal(size=(b, k, cfg.retrieval_dim)).astype(np.float32),
                context_ids=rng.integers(3, g_vocab, (b, k, c_len)).astype(np.int32),
                context_mask=np.ones((b, k, c_len), np.int32), decoder_input_ids=decoder_inputs,
                labels=labels)

    mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
    loss_fn = parts.RagLossFn(cfg, "token", rc.label_smoothing, rc.exclude_bos_score)
    optimizer = parts.make_optimizer(
        config.train, {"question_encoder": config.train.question_encoder_lr_multiplier})
    shardings = parts.state_shardings(
        optimizer, parts.abstract_params(cfg),
        parts.part_shardings({parts.rag_key: cfg}, mesh, rules)[parts.rag_key], mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    step_fn = parts.jit_train_step(lambda p, b, _, r: loss_fn(p, b, r), optimizer, shardings,
                                   batch_sharding)
    state = parts.create_state(optimizer, sharding.place(params, shardings.params), shardings)
    del params
    batch = {name: jax.device_put(v, batch_sharding) for name, v in host.items()}
    key = jax.random.key(0)
    holder = {"state": state}
    del state

    def run_jax():
        with sharding.activate(mesh, rules):
            holder["state"], metrics = step_fn(holder["state"], batch, None, key)
        return metrics["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(run_jax())
    compile_s = time.perf_counter() - t0

    model = transformers.RagTokenForGeneration.from_pretrained(folder).to(device).train()
    model.config.label_smoothing = rc.label_smoothing
    fused = {"fused": True} if device.type == "cuda" else {}
    tc = config.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, betas=(0.9, 0.999),
                            eps=1e-6, weight_decay=tc.weight_decay, **fused)
    t = {name: torch.from_numpy(v.astype(np.float32 if v.dtype == np.float32 else np.int64))
         .to(device) for name, v in host.items()}

    def run_torch():
        with autocast():
            q = model.question_encoder(t["question_ids"], attention_mask=t["question_mask"])[0]
            scores = torch.bmm(q.unsqueeze(1).float(),
                               t["doc_embeddings"].transpose(1, 2)).squeeze(1)
            out = model(context_input_ids=t["context_ids"].view(b * k, c_len),
                        context_attention_mask=t["context_mask"].view(b * k, c_len),
                        doc_scores=scores, labels=t["labels"], n_docs=k, reduce_loss=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    run_torch()  # a second warm-up for PyTorch (allocator, kernel choice); alternate adds one
    seconds = alternate({"jax": run_jax, "torch": run_torch}, s.repeats)
    attention = getattr(model.generator.config, "_attn_implementation", "?")
    return [Row("rag_token_step", f"RAG-Token train step, {b} questions x {k} documents of "
                f"{c_len} tokens, target {t_len} (BART d={g_cfg.d_model}, "
                f"{g_cfg.encoder_layers}+{g_cfg.decoder_layers} layers)", "steps/s",
                1 / seconds["jax"], 1 / seconds["torch"],
                note=f"realm-jax {g_cfg.dtype}, remat={g_cfg.remat}, compile {compile_s:.0f} s; "
                     f"PyTorch {'bf16 autocast' if device.type == 'cuda' else 'float32'}, "
                     f"{attention} attention, no checkpointing")]


# ---------------------------------------------------------------------------------------
# Entry point

def write_docs(section: str, path: Path) -> None:
    """Replace (or append) this check's section of docs/benchmarks.md."""
    import suite
    from realm_jax.durable import atomic_write_text
    previous = path.read_text() if path.exists() else suite.INTRO
    atomic_write_text(path, suite.assemble({SECTION: section}, previous))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU test run)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of "
                        f"{','.join(MEASUREMENTS)}")
    parser.add_argument("--budget_s", type=float, default=480.0,
                        help="start no measurement that would end past this many seconds")
    parser.add_argument("--out", default="", help="folder for accelerator.md, results.json")
    parser.add_argument("--write_docs", action="store_true",
                        help="replace this check's section of docs/benchmarks.md")
    parser.add_argument("--realm_batch", type=int, default=0, help="REALM queries per step")
    parser.add_argument("--rag_batch", type=int, default=0, help="RAG questions per step")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the chip's dense bfloat16 peak (default: datasheet, else measured)")
    parser.add_argument("--peak_bandwidth_gbs", type=float, default=0.0,
                        help="the chip's memory bandwidth in GB/s (default: datasheet, else "
                             "measured)")
    parser.add_argument("--compile_cache", default="",
                        help="JAX's persistent compilation cache folder (a rerun on the same "
                             "machine compiles less)")
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.only.split(",") if m.strip()] or list(MEASUREMENTS)
    unknown = sorted(set(chosen) - set(MEASUREMENTS))
    if unknown:
        parser.error(f"--only: unknown measurements {unknown}; choose from {MEASUREMENTS}")
    for name, value in MEMORY_FLAGS.items():
        os.environ.setdefault(name, value)
    if args.tiny:  # toy programs on one CPU device: compile them cheaply
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TINY_XLA_FLAGS])

    import jax
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    sizes = TINY if args.tiny else PAPER
    if args.realm_batch:
        sizes = dataclasses.replace(sizes, realm_batch=args.realm_batch)
    if args.rag_batch:
        sizes = dataclasses.replace(sizes, rag_batch=args.rag_batch)
    # The figures are per chip: with several, the steps and the corpus embedding run data
    # parallel on all of them, a per-chip batch each (the rest runs on the first).
    chips = jax.device_count()
    sizes = dataclasses.replace(sizes, realm_batch=sizes.realm_batch * chips,
                                rag_batch=sizes.rag_batch * chips,
                                embed_batch=sizes.embed_batch * chips)
    command = "python benchmarks/accelerator.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    device = describe_device(args, args.tiny)
    print(f"{device.count} x {device.kind}; PyTorch on {device.torch_device}; "
          + ", ".join(f"{k}={os.environ[k]}" for k in MEMORY_FLAGS), flush=True)
    check = Check(sizes, device, args.budget_s, Path(args.out) if args.out else None,
                  args.tiny, command.strip())
    steps = {"mips": ("device MIPS", measure_mips),
             "encoder": ("encoder forward", measure_encoder),
             "corpus_embedding": ("corpus embedding", measure_corpus_embedding),
             "realm_scann": ("REALM step, scann mode", measure_realm("scann")),
             "realm_device": ("REALM step, device mode", measure_realm("device")),
             "rag": ("RAG-Token step", measure_rag)}
    for name in MEASUREMENTS:
        if name in chosen:
            check.run(name, *steps[name])
    section = check.section()
    print("\n" + check.report(), flush=True)
    if args.write_docs:
        write_docs(section, ROOT / "docs" / "benchmarks.md")
        print(f"wrote its section of {ROOT / 'docs' / 'benchmarks.md'}")
    return 0 if not any(r.error for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
