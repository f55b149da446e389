"""``onnxprune verify``."""

from __future__ import annotations

import argparse

from onnxprune.bench import check_providers
from onnxprune.commands.arguments import (add_data_arguments, add_runtime_arguments, load_inputs, positive,
                                          tolerance)
from onnxprune.commands.base import ExitStatus, Log, Verb, print_json
from onnxprune.model_io import read_info
from onnxprune.synthetic import synthetic_dataset
from onnxprune.tables import table
from onnxprune.verify import library_use, verify

EXAMPLES = """\
  onnxprune verify model.onnx pruned.onnx --data lines.txt --tokenizer path/to/bert-dir
  onnxprune verify model.onnx pruned.onnx --data inputs.npz --atol 1e-3 --rtol 1e-2 --json
  onnxprune verify model.onnx pruned.onnx --seq-len 128 --limit 16   # random inputs, no data file
  onnxprune verify pruned.onnx pruned.onnx --library b               # function body (A) vs kernel (B)"""

DETAILS = """\
Per output: max and mean absolute and relative error (relative to A, the reference) and the
cosine similarity per example. An element fails only when it exceeds both --atol and
--rtol·|A| (Polygraphy's elementwise rule), or when it is NaN, or infinite in one model only.
Padded positions (attention_mask = 0) are left out."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="reference .onnx (dense)")
    p.add_argument("b", help="candidate .onnx (pruned)")
    add_data_arguments(p, required=False)
    p.add_argument("--seq-len", type=positive, default=128,
                   help="positions of the random inputs without --data (default 128)")
    p.add_argument("--atol", type=tolerance, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=tolerance, default=1e-3, help="relative tolerance (default 1e-3)")
    add_runtime_arguments(p, first="A", second="B")


def run(args: argparse.Namespace, log: Log) -> int:
    providers = check_providers(args.providers)
    a, b = read_info(args.a), read_info(args.b)
    if args.data:
        dataset, source = load_inputs(args, b), args.data
    else:
        count = args.limit or 8
        dataset, source = synthetic_dataset(b, count, args.seq_len), f"random ({count} x {args.seq_len} positions)"
    results = verify(a, b, dataset, args.atol, args.rtol, args.batch_size, args.threads,
                     not args.quiet, providers=providers, library=args.library)
    passed = all(r.passed for r in results)
    if args.json:
        print_json({
            "schema": "onnxprune.verify/1", "a": args.a, "b": args.b, "data": source, "examples": len(dataset),
            "atol": args.atol, "rtol": args.rtol, "providers": providers,
            "library": {"a": library_use(a, args.library, "a"), "b": library_use(b, args.library, "b")},
            "passed": passed, "outputs": [r.to_json() for r in results],
        })
    else:
        print(f"A {args.a}\nB {args.b}\n{len(dataset)} inputs from {source}; "
              f"an element fails when |A - B| > {args.atol:g} and > {args.rtol:g}·|A|")
        print(table(
            ("output", "max abs", "mean abs", "max rel", "mean rel", "cos mean", "cos min", "failed", "result"),
            [(r.name, r.max_abs, r.mean_abs, r.max_rel, r.mean_rel, f"{r.cosine_mean:.6f}", f"{r.cosine_min:.6f}",
              f"{r.failed_elements}/{r.elements}", "PASS" if r.passed else "FAIL") for r in results],
        ))
        print("PASSED" if passed else "FAILED: " + ", ".join(r.name for r in results if not r.passed))
    return ExitStatus.SUCCESS if passed else ExitStatus.CHECK_FAILED


VERB = Verb("verify", "Compare two models' outputs on the same inputs; exit 1 when B is outside the tolerances of A.",
            EXAMPLES, add_arguments, run, DETAILS)
