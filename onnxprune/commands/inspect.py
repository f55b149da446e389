"""``onnxprune inspect``."""

from __future__ import annotations

import argparse

from onnxprune.commands.base import ExitStatus, Log, Verb, print_json
from onnxprune.inspect_model import inspect
from onnxprune.inspect_report import format_report

EXAMPLES = """\
  onnxprune inspect model.onnx                       # any ONNX file: ops, weights, attention sites
  onnxprune inspect pruned.onnx --json | jq '.pruned_sites[] | {site, density, retained_mass}'
  onnxprune inspect pruned.onnx --stats stats.safetensors --heatmaps maps/   # layout + attention PNGs
  onnxprune inspect big.onnx                         # external data is sized, never loaded"""

DETAILS = """\
Works on any ONNX file and never loads external weights (their sizes come from the file's
external-data entries). Each attention site is listed with its form, heads, head size, scale,
mask and causality; each Softmax/Attention that is not a site, with the reason. A pruned
model's sites show their block layout, density and retained attention mass."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="any .onnx")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (schema onnxprune.inspect/1, docs/CLI.md)")
    p.add_argument("--heatmaps", metavar="DIR", help="write PNGs here: each pruned site's layout and, with --stats, "
                                                     "each site's average attention (pruned blocks dimmed)")
    p.add_argument("--stats", metavar="FILE", help="calibration statistics: average attention per site for --heatmaps, "
                                                   "and the mass each pruned layout keeps under them")


def run(args: argparse.Namespace, log: Log) -> int:
    info = inspect(args.model, stats=args.stats, heatmaps=args.heatmaps)
    if args.heatmaps and not info["heatmaps"]:
        why = ("the statistics name none of its sites" if args.stats
               else "give --stats to draw each site's average attention")
        log(f"onnxprune inspect: warning: no heatmap written to {args.heatmaps}: the model has no pruned sites; {why}")
    if args.json:
        print_json(info)
    else:
        print(format_report(info))
    return ExitStatus.SUCCESS


VERB = Verb("inspect", "Show what an ONNX file holds: I/O, ops, weights, attention sites, layouts, pruning metadata.",
            EXAMPLES, add_arguments, run, DETAILS)
