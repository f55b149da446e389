"""``onnxprune prune``."""

from __future__ import annotations

import argparse
import json

from onnxprune.commands.arguments import probability
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.layouts import SCOPES
from onnxprune.model_io import atomic_path, file_sha256, save_model
from onnxprune.op_schema import BLOCK_SIZES
from onnxprune.prune import prune
from onnxprune.stats import Stats
from onnxprune.tables import table

EXAMPLES = """\
  onnxprune prune model.onnx --stats stats.safetensors --sparsity 0.9 --block-size 16 -o pruned.onnx
  onnxprune prune model.onnx --stats stats.safetensors -p 0.5 --scope head -o pruned.onnx --report report.json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="dense .onnx (the one calibrated)")
    p.add_argument("--stats", required=True, help="statistics from `onnxprune calibrate`")
    p.add_argument("--sparsity", "-p", type=probability, required=True, help="fraction of blocks to prune, in [0, 1)")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=16, help="block side (default 16)")
    p.add_argument("--scope", choices=SCOPES, default="layer", help="threshold scope (default layer)")
    p.add_argument("--no-keep-diagonal", action="store_true", help="allow pruning diagonal blocks")
    p.add_argument("-o", "--output", required=True, help="output pruned .onnx")
    p.add_argument("--report", help="also write the prune report as JSON here")


def run(args: argparse.Namespace, log: Log) -> int:
    stats = Stats.load(args.stats)
    model, report = prune(args.model, stats, args.sparsity, args.block_size, args.scope,
                          keep_diagonal=not args.no_keep_diagonal, stats_sha256=file_sha256(args.stats))
    save_model(model, args.output)
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2))
    pruned_fraction = 1.0 - sum(s.density for s in report.sites) / max(len(report.sites), 1)
    if report.sites and pruned_fraction < args.sparsity - 0.005:
        # Asking beyond the cap is not an error (the layout is still the sparsest AP allows),
        # but a user comparing p's should know that two of them gave the same layout.
        log(f"onnxprune prune: warning: p = {args.sparsity} asked, {pruned_fraction:.3f} pruned: diagonal blocks "
            "(unless --no-keep-diagonal) and blocks no calibration input reached are never pruned")
    print(table(("site", "form", "causal", "density", "retained"),
                [(s.name, s.form, s.causal, f"{s.density:.3f}", f"{s.retained_mass:.3f}") for s in report.sites]))
    print(f"wrote {args.output}: p = {args.sparsity}, block {args.block_size}, scope {args.scope}, "
          f"effective sparsity on the calibration inputs {report.effective_sparsity:.3f}")
    return ExitStatus.SUCCESS


VERB = Verb("prune", "Learn block layouts (AP) and rewrite every attention site into onnxprune.BlockSparseAttention.",
            EXAMPLES, add_arguments, run)
