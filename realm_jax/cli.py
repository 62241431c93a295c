"""The `realm-jax` command. Nothing imports this module."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def _convert(args: argparse.Namespace) -> None:
    from realm_jax import hf
    from realm_jax.train import checkpoints

    if bool(args.hf) == bool(args.params):
        raise SystemExit("convert: give exactly one of --hf (HF folder -> realm-jax params) "
                         "or --params (realm-jax params -> HF folder)")
    if args.hf:
        cfg, params = hf.load(args.hf)
        out = checkpoints.save_params(args.out, cfg, params)
        print(f"wrote realm-jax params ({type(cfg).__name__}) to {out}")
    else:
        cfg, params = checkpoints.load_params(args.params)
        out = hf.save(args.out, cfg, params, architecture=args.architecture)
        print(f"wrote Hugging Face folder to {out}")


def _demo(args: argparse.Namespace) -> None:
    from realm_jax import demo
    demo.run(workdir=args.workdir, model=args.model, questions=args.question or None,
             top_k=args.top_k, max_articles=args.max_articles)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm-jax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="Hugging Face folder <-> realm-jax params checkpoint")
    p.add_argument("--hf", help="a local HF folder (config.json + model.safetensors) to read")
    p.add_argument("--params", help="a realm-jax params checkpoint to export")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--architecture", default=None,
                   help="HF architecture to export as (e.g. DPRContextEncoder); default from the model")
    p.set_defaults(run=_convert)

    p = sub.add_parser("demo", help="the main job on the embedded default data and weights")
    p.add_argument("--workdir", default="workdir/demo", help="where the corpus store goes")
    p.add_argument("--model", default=None,
                   help="HF folder of the retriever tower (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--question", action="append", help="a question (repeatable)")
    p.add_argument("--top_k", type=int, default=3)
    p.add_argument("--max_articles", type=int, default=None)
    p.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"realm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
