"""``onnxprune calibrate``."""

from __future__ import annotations

import argparse

from onnxprune.calibrate import calibrate
from onnxprune.commands.arguments import add_data_arguments, load_inputs, positive
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.model_io import load_model

EXAMPLES = """\
  onnxprune calibrate model.onnx --data lines.txt --tokenizer path/to/bert-dir -o stats.safetensors
  onnxprune calibrate model.onnx --data inputs.npz --max-length 512 -o stats.safetensors
  onnxprune calibrate model.onnx --data long.txt --tokenizer DIR --max-length 8192 -o stats.safetensors

Memory stays near a dense forward pass of one --max-length input (batches hold at most 4096
positions; no site's S x S probabilities are ever held): SmolLM2-135M at 8192 positions peaks
below 4 GB (docs/PERFORMANCE.md)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="dense .onnx")
    add_data_arguments(p)
    p.add_argument("--granularity", type=positive, default=None,
                   help="statistics cell size in positions (default 16; above --max-length 4096 the smallest power of "
                        "two giving at most 256 cells, e.g. 32 at 8192, so a file stays small; prune's --block-size "
                        "must be a multiple of it)")
    p.add_argument("-o", "--output", required=True, help="output statistics (.safetensors)")


def run(args: argparse.Namespace, log: Log) -> int:
    loaded = load_model(args.model)
    stats = calibrate(loaded, load_inputs(args, loaded.info), granularity=args.granularity,
                      max_length=args.max_length, batch_size=args.batch_size, threads=args.threads,
                      show_progress=not args.quiet)
    stats.save(args.output)
    print(f"wrote {args.output}: {len(stats.sites)} sites, {stats.num_samples} inputs, granularity {stats.granularity}")
    return ExitStatus.SUCCESS


VERB = Verb("calibrate", "Average each attention site's probabilities over data (ONNX Runtime, no PyTorch).",
            EXAMPLES, add_arguments, run)
