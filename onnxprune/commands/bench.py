"""``onnxprune bench``."""

from __future__ import annotations

import argparse

from onnxprune.bench import bench
from onnxprune.commands.arguments import add_runtime_arguments, non_negative, positive
from onnxprune.commands.base import ExitStatus, Log, Verb, print_json
from onnxprune.tables import table

EXAMPLES = """\
  onnxprune bench model.onnx pruned.onnx --seq-len 256 --threads 2
  onnxprune bench model.onnx pruned.onnx --seq-len 1024 --batch 4 --warmup 5 --repeat 50 --json
  onnxprune bench pruned.onnx pruned.onnx --library b                # function body vs kernel"""

DETAILS = """\
Runs are interleaved (A, B, A, B, ...) on the same random inputs, after --warmup untimed runs
each; the table gives the median, the spread (p10-p90 and the interquartile range) and each
model's speed-up over the first."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="one or more .onnx (the first is the baseline)")
    p.add_argument("--seq-len", type=positive, default=256, help="tokens (default 256)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=positive, default=1, help="batch size (default 1)")
    p.add_argument("--repeat", "--repeats", dest="repeat", type=positive, default=20,
                   help="timed runs per model (default 20)")
    p.add_argument("--warmup", type=non_negative, default=3, help="untimed runs per model first (default 3)")
    add_runtime_arguments(p, first="the first model", second="the second")


def run(args: argparse.Namespace, log: Log) -> int:
    timings = bench(args.models, args.seq_len, args.batch, args.threads, args.warmup, args.repeat, not args.quiet,
                    providers=args.providers, library=args.library)
    base = timings[0].median_ms
    if args.json:
        print_json({
            "schema": "onnxprune.bench/1", "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads,
            "warmup": args.warmup, "repeat": args.repeat,
            "models": [dict(t.to_json(), speedup_vs_first=base / t.median_ms) for t in timings],
        })
        return ExitStatus.SUCCESS
    print(f"batch {args.batch}, {args.seq_len} positions, threads {args.threads or 'ORT default'}, "
          f"{args.warmup} warm-up + {args.repeat} timed runs per model, interleaved; "
          f"providers {', '.join(timings[0].providers)}")
    print(table(
        ("#", "model", "library", "median ms", "p10", "p90", "IQR", "min", "speed-up"),
        [(i, t.model, t.library, f"{t.median_ms:.3f}", f"{t.p10_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.iqr_ms:.3f}",
          f"{t.min_ms:.3f}", f"{base / t.median_ms:.2f}x") for i, t in enumerate(timings)],
    ))
    return ExitStatus.SUCCESS


VERB = Verb("bench", "Latency of one or more models in ONNX Runtime, side by side in one run, with ratios.",
            EXAMPLES, add_arguments, run, DETAILS)
