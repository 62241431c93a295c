"""The `realm-jax` command. Nothing imports this module."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Sequence


def _convert(args: argparse.Namespace) -> None:
    from realm_jax import checkpoints, hf

    if sum(map(bool, (args.hf, args.params, args.workdir))) != 1:
        raise SystemExit("convert: give exactly one of --hf (HF folder -> realm-jax params), "
                         "--params (realm-jax params -> HF folder) or --workdir (a trainer "
                         "checkpoint's --part -> HF folder)")
    if args.hf:
        cfg, params = hf.load(args.hf)
        out = checkpoints.save_params(args.out, cfg, params)
        print(f"wrote realm-jax params ({type(cfg).__name__}) to {out}")
    elif args.params:
        cfg, params = checkpoints.load_params(args.params)
        out = hf.save(args.out, cfg, params, architecture=args.architecture)
        print(f"wrote Hugging Face folder to {out}")
    else:
        from realm_jax.workdir import Workdir

        # The run's tokenizer (data.tokenizer, else model.init_from_hf) goes with the part.
        workdir = Workdir(args.workdir)
        saved = (workdir.read_config().to_dict() if workdir.path("config.json").exists()
                 else {})
        tokenizer = (saved.get("data", {}).get("tokenizer")
                     or saved.get("model", {}).get("init_from_hf"))
        tokenizer = tokenizer if tokenizer and Path(tokenizer).is_dir() else None
        out, step = checkpoints.export_part(args.workdir, args.part, args.out, step=args.step,
                                            architecture=args.architecture, tokenizer=tokenizer)
        print(f"wrote the {args.part} of checkpoint step {step} as a Hugging Face folder to {out}")


def _demo(args: argparse.Namespace) -> None:
    from realm_jax import demo
    demo.run(workdir=args.workdir, model=args.model, questions=args.question or None,
             top_k=args.top_k, max_articles=args.max_articles, steps=args.steps)


def _prepare_corpus(args: argparse.Namespace) -> None:
    from realm_jax.data.corpus import prepare_corpus

    if Path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"--output {args.output} already exists; pass --overwrite to "
                              "replace it (only a block store is ever replaced)")
    same_names = ("tokenizer", "mode", "max_tokens", "passage_words", "tfds_split",
                  "tfds_data_dir", "title_field", "text_field", "max_documents", "overwrite",
                  "batch_documents")
    result = prepare_corpus(args.input, args.output, input_format=args.format,
                            id_field=args.id_field or None, progress=not args.no_progress,
                            **{name: getattr(args, name) for name in same_names})
    print(f"wrote {result.num_blocks} blocks ({result.num_tokens} tokens) from "
          f"{result.num_documents} documents to {result.path}; skipped "
          f"{result.skipped or 'nothing'}; fingerprint {result.fingerprint[:16]}")


def _corpus_update(args: argparse.Namespace) -> None:
    from realm_jax.data.corpus import update_corpus

    if args.replace_all and (args.add or args.remove):
        raise ValueError("corpus update: --replace_all takes the whole new corpus; give no "
                         "--add or --remove with it")
    if not (args.add or args.remove or args.replace_all):
        raise ValueError("corpus update: give --add docs.jsonl and/or --remove ids.txt, or "
                         "--replace_all NEW_CORPUS")
    print(update_corpus(args.store, add=args.replace_all or args.add, remove=args.remove,
                        tokenizer=args.tokenizer, replace_all=bool(args.replace_all)).summary())


def _embed_corpus(args: argparse.Namespace) -> None:
    from realm_jax import checkpoints, hf, sharding
    from realm_jax.data.store import BlockStore
    from realm_jax.index import embed_corpus as ec

    sharding.use_cpu_devices(args.cpu_devices)
    store = BlockStore.open(args.corpus)
    if args.model:
        # a realm-jax params checkpoint, else a HF folder
        cfg, params = (checkpoints.load_params(args.model)
                       if (Path(args.model) / checkpoints.MODEL_JSON).exists()
                       else hf.load_embedder(args.model))
        embedder = ec.CorpusEmbedder(cfg, batch_size=args.batch_size, dtype=args.dtype)
        rows = ec.RowBuilder.for_store(store, args.tokenizer or args.model,
                                       title=ec.TITLE_CHOICES[args.title],
                                       max_length=args.max_length or embedder.max_length)
        result = ec.embed_corpus(store, embedder, params, args.out, rows=rows,
                                 model_fingerprint=ec.params_fingerprint(cfg, params),
                                 worker=args.worker, num_workers=args.num_workers,
                                 shard_size=args.shard_size or None,
                                 progress=not args.no_progress)
        print(f"worker {args.worker}/{args.num_workers}: {result.embedded} blocks embedded "
              f"({result.docs_per_second:.1f} docs/s), {result.reused} reused, into {args.out}")
    elif not args.merge_to:
        raise ValueError("embed-corpus: give --model (to embed) and/or --merge_to (to merge)")
    if args.merge_to:
        matrix = ec.merge_shards(args.out, len(store), corpus_fingerprint=store.fingerprint,
                                 out=args.merge_to)
        print(f"merged {matrix.shape[0]} x {matrix.shape[1]} {matrix.dtype} embeddings "
              f"into {args.merge_to}")


def _refresh(args: argparse.Namespace) -> None:
    from realm_jax import distributed, refresh, sharding

    config = _config(args)
    sharding.use_cpu_devices(args.cpu_devices)
    distributed.from_args(args)
    from realm_jax.workdir import CONFIG_JSON, Workdir
    layout = Workdir(args.workdir)
    if not (layout.root / CONFIG_JSON).exists():  # a retrieval-only workdir: for `search`
        layout.create().write_config(config)
    refresh.main(config, args.workdir, once=args.once, from_hf=args.from_hf,
                 corpus=args.corpus, worker=args.worker, num_workers=args.num_workers,
                 progress=not args.no_progress)


def _config(args: argparse.Namespace):
    """The experiment config: --config (or, for the commands that read a run, the one it
    saved in WORKDIR/config.json), with the --config.FIELD=VALUE overrides."""
    from realm_jax import config as config_lib

    if args.config:
        return config_lib.parse_config_flags([f"--config={args.config}"] + args.overrides)[0]
    if not args.saved_config:
        raise ValueError(f"{args.command}: --config configs/NAME.py is required")
    from realm_jax.workdir import Workdir
    config = Workdir(args.workdir).read_config()
    for flag in args.overrides:
        dotted, _, raw = flag[len("--config."):].partition("=")
        config_lib.apply_override(config, dotted, raw)
    return config


def _train(args: argparse.Namespace) -> None:
    from realm_jax import distributed
    from realm_jax.train.trainer import Trainer

    config = _config(args)
    distributed.from_args(args)
    trainer = Trainer(config, args.workdir)
    line = trainer.task.summary(trainer.run(stop_after=args.stop_after))
    if line:
        print(line)


def _answerer(args: argparse.Namespace):
    from realm_jax import tasks

    config = _config(args)
    return tasks.get(config.task).answerer(config, args.workdir, step=args.step)


def _eval(args: argparse.Namespace) -> None:
    """Any task's answerer: the summary table, WORKDIR/eval/metrics.json (all its figures,
    the task's metrics included) and the predictions file."""
    import jax

    from realm_jax import evaluate
    from realm_jax.durable import atomic_write_text
    from realm_jax.workdir import Workdir

    summary, path = _answerer(args).evaluate(out=args.out)
    metrics = Workdir(args.workdir).eval_dir / "metrics.json"
    if jax.process_index() == 0:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(evaluate.format_summary(summary))
    print(f"metrics: {metrics}")
    print(f"predictions: {path}")


def _mine(args: argparse.Namespace) -> None:
    from realm_jax.data.dpr import read_dpr, write_dpr
    from realm_jax.index import mining

    records = read_dpr(args.input)
    if args.bm25:
        from realm_jax.data.store import BlockStore

        store = BlockStore.open(_config(args).data.corpus)
        mined, stats = mining.mine_bm25_negatives(records, store, num_negatives=args.num_negatives,
                                                  depth=args.depth)
    else:
        run = _answerer(args)   # a DPR / ICT run: the corpus embedded by its document tower
        if not hasattr(run, "embed_questions"):
            raise ValueError(f"mine: {args.workdir} is not a retriever (ict, dpr) run")
        mined, stats = mining.mine_hard_negatives(
            records, run.embed_questions([r.question for r in records]), run.searcher,
            run.store, num_negatives=args.num_negatives,
            depth=min(max(args.depth, args.num_negatives), run.searcher.size))
    write_dpr(args.output, mined)
    print(f"wrote {len(mined)} questions with mined hard_negative_ctxs to {args.output}; "
          f"{stats.as_dict()}")


def _questions(args: argparse.Namespace) -> list[str]:
    """The questions given as arguments, else one per line on stdin."""
    if any(not q.strip() for q in args.question):
        raise ValueError(f"{args.command}: empty question (give each question as a non-empty "
                         "argument)")
    questions = args.question or [line.strip() for line in sys.stdin if line.strip()]
    if not questions:
        raise ValueError(f"{args.command}: no question (give them as arguments or one per line "
                         "on stdin)")
    return questions


def _answer(args: argparse.Namespace) -> None:
    questions = _questions(args)   # checked before the run is loaded
    for a in _answerer(args).answer(questions):
        print(f"Q: {a.question}\nA: {a.answer or '(no answer)'}  (score {a.score:.3f})")
        for rank, p in enumerate(a.passages[:a.read]):
            mark = "*" if rank == a.source and a.answer else " "
            print(f"  {mark}{rank + 1}. [{p.id}] {p.title} ({p.score:.3f})")


def _search(args: argparse.Namespace) -> None:
    from realm_jax.search import Searcher

    questions = _questions(args)
    searcher = Searcher(args.workdir, _config(args) if args.config or args.overrides else None)
    for question, hits in zip(questions, searcher.search(questions, args.top_k)):
        if args.json:
            results = [dataclasses.asdict(h) for h in hits]
            print(json.dumps({"question": question, "results": results}, ensure_ascii=False))
            continue
        print(f"Q: {question}")
        for rank, h in enumerate(hits, 1):
            snippet = textwrap.shorten(h.text, 120, placeholder=" ...")
            print(f"  {rank}. [{h.id}] {h.title} ({h.score:.3f}): {snippet}")


def _aot(args: argparse.Namespace) -> None:
    from realm_jax import aot

    config = _config(args)
    if config.task != "realm":
        raise ValueError(f"aot: config.task={config.task!r}; `realm-jax aot` compiles "
                         "the REALM pre-training step")
    advice = ("spread it over more devices (--topology, --mesh with fsdp/tensor > 1), or "
              "lower --config.train.batch_size"
              + ("" if config.model.encoder.remat else
                 ", or turn on --config.model.encoder.remat"))
    try:
        result = aot.report(config, args.topology, mesh_shape=aot.parse_mesh(args.mesh),
                            corpus_rows=args.corpus_rows,
                            device_memory_gib=args.device_memory_gib)
    except aot.DoesNotFit as e:
        raise SystemExit(f"realm-jax aot: does not fit: {e}; {advice}") from None
    print("\n".join(result.lines()))
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    if result.fits is False:
        raise SystemExit(
            f"realm-jax aot: does not fit: one step needs {result.peak_bytes / aot.GIB:.2f} GiB "
            f"per device, a {result.device_kind} has {result.device_memory_bytes / aot.GIB:.2f} "
            f"GiB; {advice}")


def _embedding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--cpu_devices", type=int, default=0,
                        help="JAX CPU devices to split the cores into, each embedding a shard "
                             "of every batch (0: one per core; 1: JAX's single CPU device); "
                             "no effect on GPU/TPU devices or when XLA_FLAGS sets the count")


def _config_flag(parser: argparse.ArgumentParser, saved: bool = False,
                 fields: str = "FIELD") -> None:
    """--config (or, when `saved`, the run's own); main() collects its --config.FIELD=VALUE
    overrides into args.overrides."""
    default = "default: the run's WORKDIR/config.json" if saved else "configs/NAME.py"
    parser.add_argument("--config", help=f"experiment config ({default}); override fields "
                        f"with --config.{fields}=VALUE")
    parser.set_defaults(overrides=[], saved_config=saved)


def _score(args: argparse.Namespace) -> None:
    from realm_jax import evaluate

    print(json.dumps(evaluate.score_file(args.predictions, args.metrics), indent=2))


def build_parser() -> argparse.ArgumentParser:
    from realm_jax import distributed

    parser = argparse.ArgumentParser(prog="realm-jax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help)
        p.set_defaults(run=run)
        return p

    p = command("convert", _convert, "Hugging Face folder <-> realm-jax params checkpoint; "
                "a trainer checkpoint's part -> Hugging Face folder")
    p.add_argument("--hf", help="a local HF folder (config.json + model.safetensors) to read")
    p.add_argument("--params", help="a realm-jax params checkpoint to export")
    p.add_argument("--workdir", help="a trainer's workdir: export one --part of its checkpoint")
    p.add_argument("--part", default="reader", help="with --workdir: query_tower, doc_tower or "
                   "reader (REALM), the part to export")
    p.add_argument("--step", type=int,
                   help="with --workdir: the checkpoint step (default: newest)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--architecture", help="HF architecture to export as (e.g. "
                   "DPRContextEncoder); default from the model")

    p = command("demo", _demo, "the main job on the embedded default data and weights")
    p.add_argument("--workdir", default="workdir/demo", help="where the corpus store goes")
    p.add_argument("--model", help="HF folder of the retriever tower (default: the installed "
                   "all-MiniLM-L6-v2)")
    p.add_argument("--question", action="append", help="a question (repeatable)")
    p.add_argument("--top_k", type=int, default=3)
    p.add_argument("--max_articles", type=int, default=40,
                   help="articles of the sample to use (it has 106)")
    p.add_argument("--steps", type=int,
                   help="REALM pre-training steps (default: the demo config's; 0 skips it)")

    p = command("prepare-corpus", _prepare_corpus,
                "corpus (JSONL, TFDS, Wikipedia XML) -> block store")
    p.add_argument("--input", required=True,
                   help="a .jsonl[.gz] file, a Wikipedia .xml[.bz2] dump, or tfds:NAME")
    p.add_argument("--output", required=True, help="the block store folder to write")
    p.add_argument("--tokenizer", required=True, help="local HF folder of the model's tokenizer")
    p.add_argument("--mode", choices=("realm", "dpr"), default="realm", help="realm: blocks "
                   "of <= --max_tokens wordpieces; dpr: --passage_words passages")
    p.add_argument("--format", choices=("jsonl", "tfds", "wiki_xml"),
                   help="input format (default: guessed from --input)")
    p.add_argument("--max_tokens", type=int, default=288)
    p.add_argument("--passage_words", type=int, default=100)
    p.add_argument("--tfds_split", default="train")
    p.add_argument("--tfds_data_dir")
    p.add_argument("--id_field", default="id", help="'' numbers documents by position")
    p.add_argument("--title_field", default="title")
    p.add_argument("--text_field", default="text")
    p.add_argument("--max_documents", type=int)
    p.add_argument("--batch_documents", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no_progress", action="store_true")

    p = command("corpus", None, "block store maintenance")
    p = command("update", _corpus_update, "add, replace and remove documents as a new store "
                "version (block ids of unchanged documents stay)",
                p.add_subparsers(dest="corpus_command", required=True))
    p.add_argument("--store", required=True, help="the block store folder")
    p.add_argument("--add", help="JSONL of documents (id, title, text); an existing id is "
                   "replaced")
    p.add_argument("--remove", help="file of document ids to remove, one per line")
    p.add_argument("--replace_all", "--replace-all", metavar="NEW_CORPUS",
                   help="a whole new corpus (as for prepare-corpus: JSONL, Wikipedia XML): "
                   "the stored documents it lacks are removed, the others added, replaced or "
                   "kept with their block ids")
    p.add_argument("--tokenizer", help="HF folder the store was prepared with "
                   "(default: the one its manifest records)")

    p = command("embed-corpus", _embed_corpus, "embed a block store with a document tower, in "
                "shards (one slice per worker), and merge them")
    p.add_argument("--corpus", required=True, help="block store folder")
    p.add_argument("--out", required=True, help="folder of the embedding shards")
    p.add_argument("--model", help="a realm-jax params checkpoint or HF folder of the tower")
    p.add_argument("--tokenizer", help="HF folder of the corpus tokenizer (default: --model)")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--shard_size", type=int, default=0, help="blocks per shard (0: one per worker)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=0, help="0: the tower's maximum")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--title", choices=("auto", "yes", "no"), default="auto",
                   help="prepend titles ([CLS] title [SEP] text [SEP]); auto: for DPR passages")
    p.add_argument("--merge_to",
                   help="then merge all shards into this .npy (all ids must be covered)")
    _embedding_flags(p)

    p = command("refresh", _refresh, "keep WORKDIR/index up to date with the trainer's "
                "document tower (the refresher process)")
    _config_flag(p, fields="refresh.FIELD")
    p.add_argument("--workdir", required=True, help="the trainer's working folder")
    p.add_argument("--once", action="store_true", help="one refresh, then exit")
    p.add_argument("--from_hf", help="HF folder of a pretrained document tower: the first "
                   "index (step 0) while no checkpoint exists")
    p.add_argument("--corpus", help="block store (default: config.data.corpus)")
    p.add_argument("--worker", type=int,
                   help="this worker (0: the chief; default: the process index, else 0)")
    p.add_argument("--num_workers", type=int,
                   help="workers embedding slices (default: the process count, else 1)")
    _embedding_flags(p)
    distributed.add_flags(p)

    p = command("train", _train, "the trainer (config.task: REALM pre-training, ORQA or RAG "
                "fine-tuning, ICT or DPR retriever training); index snapshots from "
                "WORKDIR/index")
    _config_flag(p)
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, index snapshots")
    p.add_argument("--stop_after", type=int,
                   help="stop (with a checkpoint) once this step is reached; rerun to resume")
    distributed.add_flags(p)

    def run_command(name: str, run, help: str) -> argparse.ArgumentParser:
        p = command(name, run, help)
        p.add_argument("--workdir", required=True, help="the fine-tuning run's working folder")
        _config_flag(p, saved=True)
        p.add_argument("--step", type=int, help="checkpoint (default: newest)")
        return p

    p = run_command("eval", _eval, "evaluation of a run: exact match, recall@k and the task's "
                    "eval.metrics on data.eval (ORQA, RAG), recall@k of a retriever (ICT, "
                    "DPR); figures in WORKDIR/eval/metrics.json, predictions as JSONL")
    p.add_argument("--out", help="predictions file (default WORKDIR/eval/predictions.jsonl)")

    p = run_command("mine", _mine, "hard negatives for DPR training data: each question's top "
                    "passages (a retriever run's towers, or BM25 over data.corpus) without an "
                    "answer, as hard_negative_ctxs")
    p.add_argument("--input", required=True, help="DPR training data (.json / .jsonl)")
    p.add_argument("--output", required=True, help="where the mined records go")
    p.add_argument("--num_negatives", type=int, default=30, help="negatives per question")
    p.add_argument("--depth", type=int, default=100, help="passages searched per question")
    p.add_argument("--bm25", action="store_true", help="rank by BM25 (bm25s), not the run")

    p = run_command("answer", _answer, "answer questions (arguments, else one per line on "
                    "stdin) with a fine-tuning run (ORQA, RAG)")
    p.add_argument("question", nargs="*", help="questions")

    p = command("score", _score, "metrics of a predictions JSONL (question, prediction or "
                "answer, answers or gold_answers; as `realm-jax eval` writes) as JSON")
    p.add_argument("--predictions", required=True, help="the JSONL file to score")
    p.add_argument("--metrics", default="em,f1",
                   help="comma-separated: em, f1, bleu1, rougeL, qbleu1, accuracy, distinct3 "
                        "(distinctN), rprec, recall@K (KILT provenance; needs gold_passages or "
                        "provenance)")

    p = command("search", _search, "retrieve corpus documents for questions (arguments, else "
                "one per line on stdin) from WORKDIR's newest index snapshot")
    p.add_argument("--workdir", required=True, help="a workdir with an index (retrieval, "
                   "REALM, ORQA or RAG)")
    _config_flag(p, saved=True)
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON line per question")
    p.add_argument("question", nargs="*", help="questions")

    p = command("aot", _aot, "compile the REALM train step ahead of time for a device topology "
                "(e.g. a TPU slice this host does not have): memory per device and FLOPs per "
                "step; exits 1 when it does not fit")
    _config_flag(p)
    p.add_argument("--topology", required=True,
                   help="a TPU topology CHIP:SHAPE (v5e:2x2, v5p:2x2x2, v4:4x4x4; needs "
                        "libtpu: pip install 'realm-jax[aot]'), or local (this host's devices)")
    p.add_argument("--mesh", help="DATA,FSDP,TENSOR over the topology's devices (default: "
                   "config.mesh.shape)")
    p.add_argument("--corpus_rows", type=int,
                   help="retrieval.mode=device: corpus blocks held on the devices (default: "
                        "config.data.corpus's count, else 13,353,718 as REALM's Wikipedia)")
    p.add_argument("--device_memory_gib", type=float,
                   help="memory of one device (default: the runtime's, else by device kind)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides") and all(a.startswith("--config.") for a in extra):
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        args.run(args)
    except _expected_errors() as e:  # bad input or a fault: one clear line (-v: traceback)
        if args.verbose:
            traceback.print_exc()
        print(f"realm-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input or a faulty disk raises: bad values and corrupt files (ValueError,
    which orbax/tensorstore restore failures and JSON errors are too), every OSError (file
    missing or existing, permission, disk full), a damaged index snapshot, a safetensors file
    that cannot be read."""
    from safetensors import SafetensorError

    from realm_jax.index.store import SnapshotError
    return ValueError, OSError, SnapshotError, SafetensorError


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"disk full writing {error.filename or '(unknown file)'}"
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
