"""``onnxprune demo``."""

from __future__ import annotations

import argparse

from onnxprune.commands.arguments import positive, probability
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.demo import run_demo
from onnxprune.op_schema import BLOCK_SIZES

EXAMPLES = """\
  onnxprune demo
  onnxprune demo --sparsity 0.5 0.8 0.9 --block-size 32 --out out/demo32"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p.add_argument("--sparsity", type=probability, nargs="+", default=[0.5, 0.9], help="sparsities (default 0.5 0.9)")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=16, help="block side (default 16)")
    p.add_argument("--calibration-examples", type=positive, default=256,
                   help="calibration inputs: chunks of standard-library docstrings (default 256)")
    p.add_argument("--evaluation-examples", type=positive, default=200,
                   help="held-out docstrings of other modules on which pruned and dense embeddings "
                        "are compared (default 200)")


def run(args: argparse.Namespace, log: Log) -> int:
    run_demo(args.out, tuple(args.sparsity), args.block_size, calibration_examples=args.calibration_examples,
             evaluation_examples=args.evaluation_examples, threads=args.threads, log=print,
             show_progress=not args.quiet)
    return ExitStatus.SUCCESS


VERB = Verb("demo", "The whole pipeline on all-MiniLM-L6-v2 and standard-library docstrings.", EXAMPLES,
            add_arguments, run)
